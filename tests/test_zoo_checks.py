"""What the MONAI Model Zoo's CI (ci/verify_bundle.py) checks, run on the exported bundle.

The zoo verifies: configs/metadata.json and LICENSE present (models/model.pt and configs/inference.json
preferred), `version` a key of `changelog`, the metadata against its schema, `verify_net_in_out` on
network_def, and a TorchScript export of models/model.pt. Its pre-commit and storage rules add JSON
formatting and the 25 MB limit per file. One difference, which the zoo must be told about: its CI
exports with `torch.jit.script`, which this network does not compile; the bundle supports
`torch.jit.trace` (`ckpt_export --use_trace True --input_shape ... --key_in_ckpt network`), checked
below against the eager network, with the command the model card gives. The other checks call
MONAI's functions in this process, as the zoo's CI does, on the unzipped export.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from custom.bundle import bundle_root
from custom.checkpoints import load_weights, read_checkpoint, save_checkpoint
from custom.export import BUNDLE_NAME, export_bundle
from custom.networks import build_network, holohisto_tiny, network_config

REPO = Path(__file__).resolve().parents[1]
ZOO_MAX_FILE_BYTES = 25 * 2**20
PATCH = [512, 512]  # the tiny preset's training patch: the size the traced module is valid for
CONFIGS_WITH_TINY = ["configs/inference.json", "configs/tiny.json"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The export of a tiny checkpoint, unzipped: what a zoo pull request would hold."""
    work = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    net = holohisto_tiny()
    record = {"patch_size": PATCH, "patch_level": 1, "patch_mpp": None}
    checkpoint = save_checkpoint(work / "trained.pt", net, network_config(net), input_config=record)
    with zipfile.ZipFile(export_bundle(work, model=checkpoint)) as archive:
        archive.extractall(work / "unzipped")
    return work / "unzipped" / BUNDLE_NAME


@pytest.fixture(scope="module")
def schema(tmp_path_factory, fixtures_dir) -> Path:
    """A copy of the published schema where verify_metadata looks first, so nothing is downloaded."""
    copy = tmp_path_factory.mktemp("schema") / "schema.json"
    shutil.copyfile(fixtures_dir / "monai" / "meta_schema_20240725.json", copy)
    return copy


def _paths(bundle: Path, names: list[str]) -> list[str]:
    return [str(bundle / name) for name in names]


def test_metadata_passes_the_schema_and_a_broken_copy_does_not(bundle, schema, tmp_path):
    meta_file = bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    broken = json.loads(meta_file.read_text())
    del broken["network_data_format"]["outputs"]["pred"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'num_channels' is a required property"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(schema))


def test_version_is_a_key_of_the_changelog_and_names_the_zip(bundle):
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    parts = metadata["version"].split(".")
    assert len(parts) == 3 and all(
        part.isdigit() for part in parts
    )  # MAJOR.MINOR.PATCH, as the zoo's names use
    assert metadata == json.loads((bundle_root() / "configs" / "metadata.json").read_text())


def test_required_and_preferred_files_are_in_place(bundle):
    for name in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (bundle / name).is_file(), name
    assert (bundle / "LICENSE").read_text().split()[:2] == ["Apache", "License"]
    assert (bundle / "docs" / "data_license.txt").stat().st_size > 0
    assert (bundle / "docs" / "README.md").stat().st_size > 0  # the model card the zoo's browser shows


def test_no_file_is_over_25_mb(bundle):
    sizes = {p.relative_to(bundle).as_posix(): p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    assert len(sizes) > 40  # the whole bundle was walked, code included
    assert {name: size for name, size in sizes.items() if size > ZOO_MAX_FILE_BYTES} == {}


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REPO / "holohisto_bundle" / "configs").glob("*.json"))
)
def test_json_is_indented_with_4_spaces(name):
    text = (REPO / "holohisto_bundle" / "configs" / name).read_text()
    assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n"


def test_metadata_lists_every_package_the_code_imports_at_the_pinned_version(
    metadata_pins, requirements_pins
):
    assert {name: requirements_pins.get(name) for name in metadata_pins} == metadata_pins

    imported, optional = set(), set()
    for source in (REPO / "custom").rglob("*.py"):
        tree = ast.parse(source.read_text())
        imported |= _imported_modules(tree)
        for node in ast.walk(
            tree
        ):  # `try: import x` / `except ImportError`: an optional extra, said so when used
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                optional |= set().union(*(_imported_modules(statement) for statement in node.body))
    third_party = imported - optional - set(sys.stdlib_module_names) - {"custom", "__future__"}
    assert {"torch", "monai", "cv2", "tifffile", "openslide", "cucim"} <= third_party
    providers = packages_distributions()
    unlisted = {
        module for module in third_party if not {d.lower() for d in providers[module]} & set(metadata_pins)
    }
    assert unlisted == set()


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(c, ast.Name) and c.id in ("ImportError", "ModuleNotFoundError") for c in caught)


def test_verify_net_in_out_as_the_zoo_runs_it_and_with_the_tiny_override(bundle):
    meta_file = str(bundle / "configs" / "metadata.json")
    for configs in (["configs/inference.json"], CONFIGS_WITH_TINY):
        verify_net_in_out(
            net_id="network_def",
            meta_file=meta_file,
            config_file=_paths(bundle, configs),
            bundle_root=str(bundle),
        )
    # the check has teeth: a metadata that promises three output channels fails it
    with pytest.raises(ValueError, match="output channel number `2` doesn't match: `3`"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=meta_file,
            config_file=_paths(bundle, CONFIGS_WITH_TINY),
            bundle_root=str(bundle),
            **{"_meta_#network_data_format#outputs#pred#num_channels": 3},
        )


def _eager(bundle: Path) -> torch.nn.Module:
    model_file = bundle / "models" / "model.pt"
    config = read_checkpoint(model_file)["network_config"]
    return load_weights(build_network(config, load_tokenizer_checkpoint=False), model_file).eval()


def test_torchscript_export_by_trace_matches_eager_and_carries_the_metadata(bundle, tmp_path):
    """The command the model card gives, run from the bundle folder as a user runs it."""
    exported = tmp_path / "model.ts"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
        "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json",
        "--config_file", str(CONFIGS_WITH_TINY), "--key_in_ckpt", "network",
        "--use_trace", "True", "--input_shape", str([1, 3, *PATCH]),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    extra = {"metadata.json": "", "inference.json": ""}
    traced = torch.jit.load(str(exported), _extra_files=extra)
    assert (
        json.loads(extra["metadata.json"])["version"]
        == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    )
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "custom.networks.build_network"
    torch.manual_seed(1)
    images = torch.rand(1, 3, *PATCH)  # the traced shape, batch size included: the module is valid only there
    with torch.no_grad():
        expected = _eager(bundle)(images)
        torch.testing.assert_close(traced(images), expected)
    assert expected.shape == (1, 2, *PATCH)


def test_script_export_does_not_compile_so_the_zoo_must_skip_it(bundle, tmp_path):
    """The zoo's CI calls ckpt_export without use_trace; list the bundle in exclude_verify_torchscript_list."""
    with pytest.raises(torch.jit.frontend.NotSupportedError):
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp_path / "scripted.ts"),
            ckpt_file=str(bundle / "models" / "model.pt"),
            meta_file=str(bundle / "configs" / "metadata.json"),
            config_file=_paths(bundle, CONFIGS_WITH_TINY),
            key_in_ckpt="network",
            bundle_root=str(bundle),
        )
    assert not (tmp_path / "scripted.ts").exists()
