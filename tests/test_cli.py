"""`python -m custom`: every verb explains itself, and a user's mistake ends in one line, not a traceback.

Help runs in this process (fire prints it and exits 0). The error paths run as real processes,
several at once, because what the user sees is the process's stderr and exit code: one line that
starts with "error:" and names the file, exit code 2, no traceback and no library noise.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import custom.cli
from custom.checkpoints import save_checkpoint
from custom.cli import main
from custom.networks import holohisto_tiny, network_config

REPO = Path(__file__).resolve().parents[1]
VERBS = ("demo", "synth", "train", "segment", "evaluate", "export")
INPUT_RECORD = {"patch_size": [512, 512], "patch_level": 1, "patch_mpp": None}


class CodeInAPickle:
    """Unpickling this runs open(marker, "w"): a stand-in for any code a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().err  # fire writes help to stderr


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_naming_its_arguments(verb, capsys):
    text = _help([verb, "--help"], capsys)
    function = getattr(custom.cli, verb)
    summary = inspect.getdoc(function).splitlines()[0]
    assert f"{verb} - {summary}" in text
    for name in inspect.signature(function).parameters:
        assert f"--{name}" in text or name.upper() in text, f"{verb}: {name} is not in its help"


def test_top_level_help_lists_every_verb(capsys):
    text = _help(["--help"], capsys)
    commands = text.split("COMMANDS", 1)[1]
    assert [verb for verb in VERBS if re.search(rf"^\s+{verb}$", commands, re.MULTILINE)] == list(VERBS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    good = holohisto_tiny()
    config = network_config(good)
    torch.save(
        {"network": CodeInAPickle(folder / "code_ran"), "network_config": config}, folder / "hostile.pt"
    )
    return {
        "good": save_checkpoint(folder / "good.pt", good, config, input_config=INPUT_RECORD),
        # weights of a 3-class head under a record that says 2 classes
        "mismatched": save_checkpoint(
            folder / "mismatched.pt", holohisto_tiny(num_classes=3), config, input_config=INPUT_RECORD
        ),
        "hostile": folder / "hostile.pt",
    }


def test_user_errors_are_one_line_on_stderr_with_exit_code_2(checkpoints, slides_dir, tmp_path):
    slide = str(slides_dir / "derived" / "CMU-1-Small-Region.generic.tif")
    missing = str(tmp_path / "no_such_slide.svs")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unwritable = str(blocker / "out")  # a folder under a file: cannot be created, even by root
    out = str(tmp_path / "out")
    good, mismatched, hostile = (str(checkpoints[k]) for k in ("good", "mismatched", "hostile"))
    cases = {  # name: (arguments, what the one line must say)
        "missing slide": (["segment", missing, out, "--checkpoint", good], [missing, "no such slide"]),
        "mismatched checkpoint": (
            ["segment", slide, out, "--checkpoint", mismatched],
            [mismatched, "does not match the network", "wrong shape"],
        ),
        "unwritable output": (
            ["segment", slide, unwritable, "--checkpoint", good],
            [unwritable, "cannot be written"],
        ),
        "checkpoint carrying code": (["segment", slide, out, "--checkpoint", hostile], [hostile]),
        "export to an unwritable folder": (["export", unwritable], [unwritable]),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "custom", *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (argv, _) in cases.items()
    }
    problems = {}  # every case is checked before failing, so one run shows all that is wrong
    for name, process in processes.items():
        stdout, stderr = (stream.decode() for stream in process.communicate(timeout=300))
        lines = stderr.strip().splitlines()
        if process.returncode != 2 or len(lines) != 1 or "Traceback" in stdout + stderr:
            problems[name] = f"exit {process.returncode}, {len(lines)} line(s) on stderr: {stderr[-1500:]}"
        elif not lines[0].startswith("error: ") or not all(part in lines[0] for part in cases[name][1]):
            problems[name] = f"the line does not say {cases[name][1]}: {lines[0]}"
    assert problems == {}
    assert not (checkpoints["hostile"].parent / "code_ran").exists()  # refused before any of it ran
