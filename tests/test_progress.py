"""Long commands say how far they are on stderr, never on stdout: with --json the standard output is the JSON
document alone. RWKV_CONVERT_PROGRESS_AFTER=0 makes every step show (in a log, steps under 2 s are quiet)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from rwkv_convert.bundled import trained_model


def cli(*args, cwd=None):
    env = dict(os.environ, RWKV_CONVERT_PROGRESS_AFTER="0")
    return subprocess.run([sys.executable, "-m", "rwkv_convert.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=cwd)


PROGRESS = re.compile(r"^[^\"{}]+: \d+/\d+$")  # "verify: running the reference: 1/2"


def progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if PROGRESS.match(line)]


@pytest.mark.parametrize("command", ["verify", "quality", "release", "convert"])
def test_progress_goes_to_stderr_and_json_alone_to_stdout(command, tmp_path):
    source = trained_model("v7")
    if command == "verify":
        args = ["verify", source, "--reference", source, "--tokens", "8", "--json"]
    elif command == "quality":
        args = ["quality", source, "--schemes", "fp32,bf16", "--max-bytes", "2000", "--json"]
    elif command == "release":
        spec = tmp_path / "r.toml"
        spec.write_text(f'[sources]\nv7 = "{source}"\n[[artifact]]\nname = "st"\nto = "safetensors"\n'
                        'layout = "web-rwkv"\n[release]\ntokens = 8\n')
        args = ["release", spec, "--out", tmp_path / "out", "--json"]
    else:
        args = ["convert", source, "-o", tmp_path / "m.gguf", "--target-size", "60%"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = progress_lines(proc.stderr)
    assert lines, proc.stderr[-3000:]
    if command == "convert":
        assert proc.stdout == ""
        assert any(line.startswith("--target-size: measuring") for line in lines), lines
    else:
        json.loads(proc.stdout)  # the document alone
        assert not progress_lines(proc.stdout)
    if command in ("verify", "release"):
        assert any(line.startswith("verify: running the reference") for line in lines), lines


def test_an_unreachable_target_size_is_refused_before_any_work(tmp_path):
    proc = cli("convert", trained_model("v7"), "-o", tmp_path / "m.gguf", "--target-size", "1%")
    assert proc.returncode == 2
    assert "below the smallest this model can be" in proc.stderr
    assert not progress_lines(proc.stderr)  # nothing was measured first
    assert not (tmp_path / "m.gguf").exists()
