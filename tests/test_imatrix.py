"""llama.cpp's importance matrix both ways: ours written as an imatrix.gguf reads back as our statistics and is
loaded by llama-quantize --imatrix; llama-imatrix's own file (and the legacy .dat layout) reads as the same
statistics ours measures; a file for another model, or a GGUF that is no importance matrix, is one line."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv_convert
from rwkv_convert.bundled import trained_model
from rwkv_convert.calibration import activation_importance
from rwkv_convert.formats.gguf_imatrix import matrix_names, read_imatrix, write_imatrix

from .test_cli import assert_one_line_error, cli

# llama.cpp's tools, built from the llama-cpp-python sdist's source (.ci/run builds them)
LLAMA_BIN = os.environ.get("RWKV_CONVERT_LLAMA_BIN")
needs_tools = pytest.mark.skipif(not LLAMA_BIN and os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA_TOOLS") != "1",
                                 reason="needs llama-quantize and llama-imatrix (RWKV_CONVERT_LLAMA_BIN)")


@pytest.fixture(scope="module")
def model():
    return rwkv_convert.read_checkpoint(trained_model("v7"))


@pytest.fixture(scope="module")
def ours(model, tmp_path_factory):
    return write_imatrix(model, tmp_path_factory.mktemp("imatrix") / "imatrix.gguf")


def test_ours_reads_back_as_our_statistics(model, ours):
    back = read_imatrix(ours, model)
    measured = activation_importance(model, "bundled")
    assert set(back) == set(matrix_names(model).values()) and "head.weight" in back
    for key, values in back.items():
        assert torch.allclose(values, measured[key].float(), rtol=1e-5), key


def test_legacy_dat_reads_as_the_gguf_does(model, ours, tmp_path):
    gguf_entries = read_imatrix(ours, model)
    names = {v: k for k, v in matrix_names(model).items()}
    ncall = 7
    data = struct.pack("<i", len(gguf_entries))
    for key, values in gguf_entries.items():
        name = names[key].encode()
        data += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, values.numel())
        data += (values.numpy() * ncall).astype("<f4").tobytes()  # llama-imatrix's legacy: mean x ncall
    data += struct.pack("<i", 16) + struct.pack("<i", 7) + b"dataset"
    legacy = tmp_path / "imatrix.dat"
    legacy.write_bytes(data)
    for key, values in read_imatrix(legacy, model).items():
        assert torch.allclose(values, gguf_entries[key], rtol=1e-6), key


def test_files_for_another_model_or_no_imatrix_are_one_line(ours, tmp_path):
    other = trained_model("v6")
    assert_one_line_error(cli("convert", other, "--to", "gguf", "--quant", "q4_k", "--imatrix", ours, "-o",
                              tmp_path / "x.gguf"), "made for another model|no entry for any matrix")
    f16 = rwkv_convert.convert(trained_model("v7"), "gguf", tmp_path / "f16.gguf", quant="f16")[0]
    assert_one_line_error(cli("convert", trained_model("v7"), "--to", "gguf", "--quant", "q4_k", "--imatrix", f16,
                              "-o", tmp_path / "y.gguf"), "not an importance matrix")
    assert_one_line_error(cli("convert", trained_model("v7"), "--to", "gguf", "--quant", "q4_k", "--imatrix", ours,
                              "--calibration", "bundled", "-o", tmp_path / "z.gguf"), "give one of them")
    assert not any(p.name in ("x.gguf", "y.gguf", "z.gguf") for p in tmp_path.iterdir())


def test_convert_with_an_imatrix_verifies_in_llama_cpp(ours, tmp_path):
    pytest.importorskip("llama_cpp")
    from rwkv_convert.verify import verify

    out = rwkv_convert.convert(trained_model("v7"), "gguf", tmp_path / "q3.gguf", quant="q3_k_m", imatrix=str(ours))[0]
    assert verify(out, trained_model("v7"), tokens=16).passed


def test_the_cli_writes_one(tmp_path):
    proc = cli("imatrix", trained_model("v7"), "-o", tmp_path / "im.gguf")
    assert proc.returncode == 0, proc.stderr
    assert read_imatrix(tmp_path / "im.gguf", rwkv_convert.read_checkpoint(trained_model("v7")))


@needs_tools
def test_llama_quantize_loads_ours_and_ours_reads_llama_imatrix(model, ours, tmp_path):
    tools = Path(LLAMA_BIN)
    f16 = rwkv_convert.convert(trained_model("v7"), "gguf", tmp_path / "f16.gguf", quant="f16")[0]
    done = subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(ours), str(f16), str(tmp_path / "q.gguf"),
                           "Q3_K_M", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"loaded {len(matrix_names(model))} importance matrix entries" in done.stdout + done.stderr
    theirs = tmp_path / "theirs.gguf"
    text = Path(rwkv_convert.__file__).parent / "trained" / "calibration.txt"
    done = subprocess.run([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-c", "512", "-o",
                           str(theirs), "--no-ppl"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    read, measured = read_imatrix(theirs, model), read_imatrix(ours, model)
    assert len(read) >= len(measured) - 1  # llama-imatrix leaves output.weight out
    for key, values in read.items():
        corr = np.corrcoef(values.numpy(), measured[key].numpy())[0, 1]
        assert corr > 0.9, (key, corr)
