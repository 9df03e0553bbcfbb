"""Run the bundle's own configs from Python, so the command line and the bundle are one program."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow

from custom.errors import ConfigError


def bundle_root() -> Path:
    """The bundle folder: `custom`'s parent inside an exported bundle, or `holohisto_bundle/` in the repo."""
    here = Path(__file__).resolve().parent.parent
    for root in (here, here / "holohisto_bundle"):
        if (root / "configs" / "metadata.json").is_file():
            return root
    raise ConfigError(f"cannot find the bundle's configs next to {Path(__file__).resolve().parent}")


def config_paths(*names: str) -> list[str]:
    root = bundle_root()
    paths = []
    for name in names:
        path = root / "configs" / (name if name.endswith(".json") else f"{name}.json")
        if not path.is_file():
            raise ConfigError(f"{path}: no such bundle config")
        paths.append(str(path))
    return paths


def resolve_macros(parser: ConfigParser) -> ConfigParser:
    """Replace the configs' `%configs/<file>.json#<id>` macros by that content (train_tokenizer.json shares
    train.json's blocks so). MONAI reads a macro's file from the working directory, which is the bundle
    folder for `python -m monai.bundle run`; here it is the bundle folder wherever Python runs."""
    with contextlib.chdir(bundle_root()):
        parser.resolve_macro_and_relative_ids()
    return parser


def config_parser(*names: str, **overrides) -> ConfigParser:
    """The named configs merged (later ones override earlier ones), macros resolved, then `overrides` set."""
    parser = ConfigParser()
    parser.read_config(config_paths(*names))
    resolve_macros(parser).update({"bundle_root": str(bundle_root()), **overrides})
    return parser


def workflow(configs: list[str], workflow_type: str, **overrides) -> ConfigWorkflow:
    """An initialised ConfigWorkflow over the named configs (later ones override earlier ones)."""
    root = bundle_root()
    flow = ConfigWorkflow(
        config_file=config_paths(*configs),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
    )
    # Macros first, so that an override may reach inside a block a macro brings in.
    resolve_macros(flow.parser).update({"bundle_root": str(root), **overrides})
    # MONAI's logging config sets the root logger to INFO on stdout; keep library chatter out of the way.
    logging.getLogger("ignite").setLevel(logging.WARNING)
    flow.initialize()
    return flow
