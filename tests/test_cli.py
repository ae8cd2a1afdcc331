"""The `rwkv-convert` command as users run it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rwkv_convert
from rwkv_convert.bundled import DEFAULT_PROMPT
from rwkv_convert.fixtures import VARIANTS, fixture_path, make_state_dict
from rwkv_convert.generate import generate
from rwkv_convert.tokenizer import WorldTokenizer

from .conftest import save_atomic
from .test_checkpoint import EXPECTED, bad_files


def cli(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "rwkv_convert.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def assert_one_line_error(proc, pattern=None):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    if pattern:
        assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.slow
def test_inspect_json_reports_version_and_dims(variant, fixture_dir):
    proc = cli("inspect", fixture_path(variant, "bf16", directory=fixture_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["version"] == EXPECTED[variant]
    assert (info["n_layer"], info["n_embd"], info["vocab_size"]) == (7, 128, 512)
    assert info["dtypes"] == {"bfloat16": info["dtypes"]["bfloat16"]}
    assert info["file_size"] == fixture_path(variant, "bf16", directory=fixture_dir).stat().st_size
    assert info["capabilities"]["run"].startswith("yes")


def test_inspect_table_for_one_layer_v52(tmp_path):
    path = save_atomic(make_state_dict("v5.2", n_layer=1), tmp_path / "one.pth")
    proc = cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    assert "RWKV-5.2 (Eagle), version 5.2" in proc.stdout
    assert [line.split() for line in proc.stdout.splitlines() if line.startswith("layers")] == [["layers", "1"]]


def test_inspect_v7_shows_lora_ranks_and_unused_layer0_keys(fixture_dir):
    proc = cli("inspect", fixture_path("v7-layer0-v", directory=fixture_dir))
    assert "w=32, a=24, g=48, v=16" in proc.stdout
    assert "blocks.0.att.v0" in proc.stdout


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(tmp_path, fixture_dir):
    for _name, path, pattern in bad_files(tmp_path, fixture_dir):
        assert_one_line_error(cli("inspect", path), pattern)
        assert_one_line_error(cli("run", path, "--tokens", "1"), pattern)


def test_evil_pickle_never_runs(tmp_path, fixture_dir):
    bad_files(tmp_path, fixture_dir)
    proc = cli("inspect", tmp_path / "evil.pth")
    assert "this ran" not in proc.stdout + proc.stderr
    assert_one_line_error(proc, "refusing to load")


@pytest.mark.parametrize("strategy,pattern", [
    ("cpu fp64", r"'fp64' \(segment 1\) is not a dtype"),
    ("gpu fp16", r"'gpu' \(segment 1\) is not a device"),
    ("cpu fp16i4", "i4 weights do not exist"),
    ("cpu fp16 *x", "is not a layer count"),
    ("cuda fp16", "no CUDA device"),
    ("", "empty strategy"),
])
@pytest.mark.slow
def test_bad_strategy_exits_2(strategy, pattern, fixture_dir):
    assert_one_line_error(cli("run", fixture_path("v6", directory=fixture_dir), "--strategy", strategy), pattern)


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("--debug", "inspect", tmp_path / "nope.pth")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_run_without_path_uses_the_bundled_trained_model():
    proc = cli("run", "--prompt", "Hello", "--tokens", "8", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello") and len(proc.stdout) > len("Hello")
    assert "RWKV-7 trained on Python's standard library" in proc.stderr
    proc = cli("run", "--tokens", "40", "--temperature", "0")  # its own prompt: the start of a Python line
    assert proc.returncode == 0 and proc.stdout.startswith(DEFAULT_PROMPT), proc.stderr


def test_run_streams_the_greedy_continuation(fixture_dir):
    path = fixture_path("v5.2", directory=fixture_dir)
    proc = cli("run", path, "--prompt", "The cat", "--tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    model = rwkv_convert.load(path)
    # a 512-id model is byte-level: ids 1..256 of the World vocabulary are its bytes
    expected = "".join(generate(model, WorldTokenizer(vocab_size=257), "The cat", 12, temperature=0))
    assert proc.stdout == "The cat" + expected + "\n"


@pytest.mark.slow
def test_run_same_seed_same_text(fixture_dir):
    path = fixture_path("v4", directory=fixture_dir)
    runs = [cli("run", path, "--tokens", "10", "--seed", "7") for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout) > len("\nUser: Hello!\n\nAssistant:")


@pytest.mark.slow
def test_run_with_a_hugging_face_tokenizer(tmp_path, fixture_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    proc = cli("run", fixture_path("v4", directory=fixture_dir), "--tokenizer", tmp_path / "tokenizer.json",
               "--prompt", "the cat", "--tokens", "5", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the cat")
    (tmp_path / "broken.json").write_text("{")
    assert_one_line_error(cli("run", fixture_path("v4", directory=fixture_dir), "--tokenizer",
                              tmp_path / "broken.json"), "not a readable tokenizer.json")


@pytest.mark.slow
def test_make_fixture_writes_a_loadable_file(tmp_path):
    proc = cli("make-fixture", "v5.1", "--dtype", "bf16", "--layers", "2", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert rwkv_convert.read_checkpoint(proc.stdout.strip()).spec.n_layer == 2
    assert_one_line_error(cli("make-fixture", "v9"), "unknown fixture variant")


def test_quant_names_as_llama_cpp_prints_them_and_the_format_from_the_suffix(fixture_dir, tmp_path):
    """`-o m.gguf --quant Q8_0`: the upper-case name llama.cpp prints is the same type, and .gguf says the format."""
    from rwkv_convert.formats.gguf_file import tensor_schemes

    src = fixture_path("v6", directory=fixture_dir)
    proc = cli("convert", src, "-o", tmp_path / "m.gguf", "--quant", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "q8_0" in tensor_schemes(tmp_path / "m.gguf")
    assert_one_line_error(cli("convert", src, "-o", tmp_path / "m.bin"), "cannot tell the format")
    assert not (tmp_path / "m.bin").exists()


def test_inspect_reads_every_format_we_write(fixture_dir, tmp_path):
    """Files made for one runtime (pip, prepared, ONNX) are described by what their runner holds; a GGUF by its
    own tensor types, not only the float32 it reads back as; an export of several files by all of them."""
    src = fixture_path("v6", directory=fixture_dir)
    made = {"pip": rwkv_convert.convert(src, "pip", tmp_path / "p.pth", strategy="cpu fp32i8")[0],
            "prepared": rwkv_convert.convert(src, "safetensors", tmp_path / "p.safetensors", layout="prepared",
                                             strategy="cpu fp16")[0],
            "onnx": tmp_path / "m.onnx", "hf": tmp_path / "hf",
            "gguf": rwkv_convert.convert(src, "gguf", tmp_path / "m.gguf", quant="q8_0")[0]}
    rwkv_convert.convert(src, "onnx", made["onnx"], external_data=True)
    rwkv_convert.convert(make_state_dict_path(tmp_path), "safetensors", made["hf"], layout="hf")
    for kind, path in made.items():
        proc = cli("inspect", path, "--json")
        assert proc.returncode == 0, (kind, proc.stderr)
        info = json.loads(proc.stdout)
        assert info["n_layer"] >= 1 and info["format"], kind
        on_disk = sum(f.stat().st_size for f in (path.rglob("*") if path.is_dir() else
                                                  [Path(f) for f in info["files"]]) if f.is_file())
        assert info["file_size"] == on_disk, kind
    assert json.loads(cli("inspect", made["pip"], "--json").stdout)["strategy"] == "cpu fp32i8"
    assert json.loads(cli("inspect", made["prepared"], "--json").stdout)["strategy"] == "cpu fp16"
    assert json.loads(cli("inspect", made["gguf"], "--json").stdout)["stored"]["Q8_0"] >= 1
    assert len(json.loads(cli("inspect", made["onnx"], "--json").stdout)["files"]) == 3


def make_state_dict_path(tmp_path):
    return save_atomic(make_state_dict("v7", n_layer=1, n_embd=64, vocab=300), tmp_path / "v7.pth")
