"""Faults a converter meets, through the real CLI: one line, exit code 2, no file left but complete outputs,
and the source never changed (its hash checked)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import rwkv_convert
from rwkv_convert.fixtures import fixture_path

from .test_cli import assert_one_line_error, cli

# ONNX outputs end in .onnx: the case of an ONNX file that is an input is the data-file test below.
TARGETS = [["--to", "gguf"], ["--to", "pip"], ["--to", "safetensors", "--layout", "web-rwkv"],
           ["--to", "safetensors", "--layout", "prepared"]]


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(digest(p).encode() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t[-1])
def test_output_equal_to_the_input_is_refused_and_the_input_kept(target, fixture_dir, tmp_path):
    src = tmp_path / "model.pth"
    shutil.copyfile(fixture_path("v6", directory=fixture_dir), src)
    (tmp_path / "hard.pth").hardlink_to(src)
    (tmp_path / "soft.pth").symlink_to(src)
    before, names = digest(src), sorted(p.name for p in tmp_path.iterdir())
    for output in (src, tmp_path / "hard.pth", tmp_path / "soft.pth", tmp_path / "." / "model.pth"):
        assert_one_line_error(cli("convert", src, *target, "-o", output), "refusing to write .* the input")
        assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_no_file_of_a_multi_file_output_may_be_the_input(fixture_dir, tmp_path):
    """An ONNX export writes OUT.data beside the graph: a source of that name is refused, not overwritten."""
    src = tmp_path / "m.onnx.data"
    shutil.copyfile(fixture_path("v6", directory=fixture_dir), src)
    before = digest(src)
    assert_one_line_error(cli("convert", src, "--to", "onnx", "-o", tmp_path / "m.onnx"), "refusing to write")
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]


def test_output_inside_an_input_hf_directory_is_refused(fixture_dir, tmp_path):
    hf = tmp_path / "hf"
    rwkv_convert.convert(fixture_path("v7", directory=fixture_dir), "safetensors", hf, layout="hf")
    before, names = digest(hf), sorted(p.name for p in hf.iterdir())
    assert_one_line_error(cli("convert", hf, "--to", "gguf", "-o", hf / "m.gguf"), "is inside the input")
    assert_one_line_error(cli("convert", hf, "--to", "safetensors", "--layout", "hf", "-o", hf), "is the input")
    assert digest(hf) == before and sorted(p.name for p in hf.iterdir()) == names
