"""Faults a converter meets, through the real CLI: one line, exit code 2, no file left but complete outputs,
and the source never changed (its hash checked)."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import rwkv_convert
from rwkv_convert.atomic import TEMP_SUFFIX, AtomicOutput
from rwkv_convert.cli_support import printable, unescape
from rwkv_convert.errors import brief
from rwkv_convert.fixtures import fixture_path, make_state_dict
from rwkv_convert.runtimes.onnx_runtime import OnnxModel

from .conftest import save_atomic
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


@pytest.mark.slow
def test_no_file_of_a_multi_file_output_may_be_the_input(fixture_dir, tmp_path):
    """An ONNX export writes OUT.data beside the graph: a source of that name is refused, not overwritten."""
    src = tmp_path / "m.onnx.data"
    shutil.copyfile(fixture_path("v6", directory=fixture_dir), src)
    before = digest(src)
    assert_one_line_error(cli("convert", src, "--to", "onnx", "-o", tmp_path / "m.onnx"), "refusing to write")
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]


@pytest.mark.slow
def test_output_inside_an_input_hf_directory_is_refused(fixture_dir, tmp_path):
    hf = tmp_path / "hf"
    rwkv_convert.convert(fixture_path("v7", directory=fixture_dir), "safetensors", hf, layout="hf")
    before, names = digest(hf), sorted(p.name for p in hf.iterdir())
    assert_one_line_error(cli("convert", hf, "--to", "gguf", "-o", hf / "m.gguf"), "is inside the input")
    assert_one_line_error(cli("convert", hf, "--to", "safetensors", "--layout", "hf", "-o", hf), "is the input")
    assert digest(hf) == before and sorted(p.name for p in hf.iterdir()) == names


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """Big enough (0.3 GB) that a conversion is still writing when a signal arrives."""
    path = tmp_path_factory.mktemp("big") / "big-v7.pth"
    return save_atomic(make_state_dict("v7", n_layer=4, n_embd=512, vocab=65536), path)


SIGNAL_CASES = [(signal.SIGTERM, ["--to", "gguf", "--quant", "q8_0"], "m.gguf"),
                (signal.SIGTERM, ["--to", "safetensors", "--layout", "hf"], "hf"),
                (signal.SIGTERM, ["--to", "onnx"], "m.onnx"),
                (signal.SIGHUP, ["--to", "safetensors", "--layout", "web-rwkv"], "m.st"),
                (signal.SIGTERM, ["--to", "safetensors", "--layout", "prepared", "--strategy", "cpu fp32i8"], "p.st"),
                (signal.SIGINT, ["--to", "gguf", "--quant", "q8_0"], "m.gguf")]


@pytest.mark.slow
@pytest.mark.parametrize("sig,target,name", SIGNAL_CASES, ids=lambda c: getattr(c, "name", None))
def test_a_signal_mid_write_leaves_nothing(sig, target, name, big_source, tmp_path):
    before = digest(big_source)
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-m", "rwkv_convert.cli", "convert", str(big_source), *target,
                              "-o", str(out / name)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(TEMP_SUFFIX in p.name for p in out.iterdir()):  # writing has begun
        assert child.poll() is None, f"finished before it could be interrupted: {child.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child.send_signal(sig)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no partial output was left" in lines[0] and "Traceback" not in err, err
    assert list(out.iterdir()) == []
    assert digest(big_source) == before


@pytest.mark.slow
def test_a_later_run_removes_temps_of_dead_runs_only(fixture_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".m.gguf.{dead_pid}{TEMP_SUFFIX}"
        stale_dir = tmp_path / f".m.gguf.{dead_pid}{TEMP_SUFFIX}.data"
        busy = tmp_path / f".m.gguf.{alive.pid}{TEMP_SUFFIX}"
        other = tmp_path / f".other.gguf.{dead_pid}{TEMP_SUFFIX}"
        for path in (stale, busy, other):
            path.write_bytes(b"x" * 100)
        stale_dir.write_bytes(b"x")
        proc = cli("convert", fixture_path("v6", directory=fixture_dir), "--to", "gguf", "-o", tmp_path / "m.gguf")
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, other.name, "m.gguf"])
    finally:
        alive.kill()


def test_outputs_published_at_the_same_moment_are_never_mixed(tmp_path):
    """Two writers of one three-file output publish at once (a barrier holds both just before): every time, all
    three files come from the same writer. (Without the publishing lock about half of these runs mix.)"""
    finals = [tmp_path / "m.onnx.data", tmp_path / "m.onnx", tmp_path / "m.seq.onnx"]
    for _ in range(200):
        barrier = threading.Barrier(2)

        def write(tag: str, barrier: threading.Barrier = barrier) -> None:
            with AtomicOutput(*finals) as out:
                for final in finals:
                    out.temp(final).write_text(tag)
                barrier.wait()

        threads = [threading.Thread(target=write, args=(tag,)) for tag in "AB"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({f.read_text() for f in finals}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in finals)


@pytest.mark.slow
def test_two_concurrent_onnx_exports_to_one_path_leave_one_whole_export(fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    out = tmp_path / "m.onnx"
    for _ in range(3):
        runs = [subprocess.Popen([sys.executable, "-m", "rwkv_convert.cli", "convert", str(src), "--to", "onnx",
                                  "--dtype", dtype, "-o", str(out)], stderr=subprocess.PIPE, text=True)
                for dtype in ("fp32", "fp16")]
        errors = [run.communicate(timeout=300)[1] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], errors
        for err in errors:  # each run reports the sizes it wrote itself
            assert len([line for line in err.splitlines() if line.startswith("wrote ")]) == 3, err
        model = OnnxModel(out)
        graphs = {model.step.get_modelmeta().custom_metadata_map["rwkv.dtype"],
                  model.sequence.get_modelmeta().custom_metadata_map["rwkv.dtype"]}
        assert len(graphs) == 1  # both graphs from one run, with its data file (the forward would fail otherwise)
        assert torch.isfinite(model.forward([1, 2, 3])[0]).all()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "m.seq.onnx"]


@pytest.fixture(scope="module")
def non_finite_sources(fixture_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("non-finite")
    found = {}
    for name, value, key in (("nan", float("nan"), "blocks.3.att.key.weight"), ("inf", float("inf"), "emb.weight"),
                             ("bf16-inf", float("-inf"), "blocks.6.ffn.value.weight")):
        dtype = "bf16" if name.startswith("bf16") else "fp32"
        sd = torch.load(fixture_path("v6", dtype, directory=fixture_dir), weights_only=True)
        sd[key] = sd[key].clone()
        sd[key].view(-1)[7] = value
        found[name] = (save_atomic(sd, folder / f"{name}.pth"), key)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nan", "inf", "bf16-inf"])
@pytest.mark.parametrize("target", TARGETS + [["--to", "onnx"]], ids=lambda t: t[-1])
def test_non_finite_weights_are_refused_with_the_tensors_name(case, target, non_finite_sources, tmp_path):
    src, key = non_finite_sources[case]
    before = digest(src)
    proc = cli("convert", src, *target, "-o", tmp_path / ("out.onnx" if "onnx" in target else "out"))
    assert_one_line_error(proc, f"tensor {key} holds 1 NaN or infinite values")
    assert list(tmp_path.iterdir()) == [] and digest(src) == before


@pytest.mark.slow
def test_run_refuses_non_finite_weights_and_logits(non_finite_sources, fixture_dir, tmp_path):
    assert_one_line_error(cli("run", non_finite_sources["nan"][0], "--tokens", "3"), "holds 1 NaN or infinite")
    # finite weights whose logits overflow: a huge head in fp16
    sd = torch.load(fixture_path("v7", directory=fixture_dir), weights_only=True)
    sd["head.weight"] = sd["head.weight"] * 1e6
    src = save_atomic(sd, tmp_path / "overflow.pth")
    assert_one_line_error(cli("run", src, "--tokens", "3", "--strategy", "cpu fp16"), "NaN or infinite logits")


@pytest.mark.slow
def test_small_faults_are_one_line(fixture_dir, tmp_path):
    v6 = fixture_path("v6", directory=fixture_dir)
    assert_one_line_error(cli("run", v6, "--strategy", "cpu fp16", "--tokens", "2",
                              env_extra={"RWKV_RESCALE_LAYER": "abc"}), "RWKV_RESCALE_LAYER='abc' is not a whole")
    assert_one_line_error(cli("plan", v6, "--strategy", "cuda:99999999999 fp16"), "is not a device")
    assert_one_line_error(cli("plan", v6, "--strategy", "cpu fp16 *١"), "is not a layer count")
    proc = cli("verify", v6, "--reference", v6, "--json-out", tmp_path / "missing" / "r.json")
    assert_one_line_error(proc, "the directory .* does not exist")
    assert "PASS" not in proc.stdout  # refused before the run, not after it printed a verdict


def test_prompt_escapes_and_terminal_safe_text():
    assert unescape(r"User: hi\n\nAssistant:") == "User: hi\n\nAssistant:"
    assert unescape(r"a\tb \\n") == "a\tb \\n"
    assert printable("ok\n\ttab \x1b[2J\x07") == "ok\n\ttab \\x1b[2J\\x07"
    assert brief("word " * 100, 30) == "word word word word word word ..." and len(brief("x" * 10)) == 10


@pytest.mark.slow
def test_run_takes_newlines_in_the_prompt_and_convert_verifies_with_our_reader(fixture_dir, tmp_path):
    proc = cli("run", fixture_path("v5.2", directory=fixture_dir), "--prompt", r"User: hi\n\nAssistant:",
               "--tokens", "3", "--seed", "1")
    assert proc.returncode == 0 and proc.stdout.startswith("User: hi\n\nAssistant:"), proc.stderr
    proc = cli("convert", fixture_path("v7", directory=fixture_dir), "--to", "gguf", "-o", tmp_path / "m.gguf",
               "--verify", "--runner", "ours", "--tokens", "8")
    assert proc.returncode == 0 and "rwkv-convert runner" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_weights_that_are_not_floats_are_refused_and_fp64_is_said(fixture_dir, tmp_path):
    sd = torch.load(fixture_path("v6", directory=fixture_dir), weights_only=True)
    key = "blocks.1.att.key.weight"
    for name, value in (("i64", (sd[key] * 100).long()), ("c64", sd[key].to(torch.complex64)),
                        ("bool", sd[key] > 0)):
        src = save_atomic({**sd, key: value}, tmp_path / f"{name}.pth")
        assert_one_line_error(cli("convert", src, "--to", "gguf", "-o", tmp_path / "m.gguf"),
                              f"tensor {key} is {str(value.dtype).removeprefix('torch.')}; RWKV weights are floating")
    assert not (tmp_path / "m.gguf").exists()
    wide = save_atomic({k: v.double() for k, v in sd.items()}, tmp_path / "f64.pth")
    proc = cli("convert", wide, "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "float64 tensors" in notes[0] and "cast to float32" in notes[0], proc.stderr


def save_tokenizer(path: Path, vocab_size: int, unknown: str | None = "[UNK]") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unknown))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the cat sat on the mat " * 20 + " ".join(str(i) for i in range(3000))]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[unknown or "[PAD]"]))
    tok.save(str(path))
    return path


@pytest.mark.slow
def test_a_tokenizer_that_does_not_fit_the_model_is_one_line(fixture_dir, tmp_path):
    v4 = fixture_path("v4", directory=fixture_dir)  # 512 ids
    wide = save_tokenizer(tmp_path / "wide.json", 2000)
    proc = cli("run", v4, "--tokenizer", wide, "--prompt", "the cat", "--tokens", "3")
    assert_one_line_error(proc, "has 2000 token ids but the model's vocabulary has 512")
    assert proc.stdout == ""  # nothing of the prompt printed before the error
    narrow = save_tokenizer(tmp_path / "narrow.json", 60)
    proc = cli("run", v4, "--tokenizer", narrow, "--prompt", "the cat", "--tokens", "3", "--seed", "1")
    assert proc.returncode == 0 and proc.stdout.startswith("the cat"), proc.stderr
    assert proc.stderr.startswith("note: ") and "60 token ids and the model 512" in proc.stderr
    no_unknown = save_tokenizer(tmp_path / "no-unk.json", 60, unknown=None)
    proc = cli("run", v4, "--tokenizer", no_unknown, "--prompt", "ZZZ", "--tokens", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    last = proc.stderr.splitlines()[-1]
    assert last == "error: the tokenizer turns the prompt 'ZZZ' into no tokens; check --tokenizer"
    neox = make_state_dict("v4", n_layer=1, n_embd=64, vocab=50277)
    assert_one_line_error(cli("run", save_atomic(neox, tmp_path / "neox.pth"), "--tokens", "2"),
                          "GPT-NeoX vocabulary .* pass --tokenizer 20B_tokenizer.json")


def flip_bits(path: Path, start: int, count: int, mask: int = 0x40) -> None:
    """XOR `mask` into `count` bytes from `start`, in place (a damaged download or disk)."""
    with open(path, "r+b") as f:
        f.seek(start)
        data = bytearray(f.read(count))
        f.seek(start)
        f.write(bytes(b ^ mask for b in data))


def zip_record_start(path: Path, index: int) -> int:
    import struct
    import zipfile

    info = [i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename][index]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.slow
def test_a_pth_whose_bytes_no_longer_match_their_crc_is_refused(fixture_dir, tmp_path):
    src = tmp_path / "damaged.pth"
    shutil.copyfile(fixture_path("v6", directory=fixture_dir), src)
    flip_bits(src, zip_record_start(src, 0) + 100, 1)  # a mantissa bit of one emb.weight value: still finite
    before = digest(src)
    (tmp_path / "out").mkdir()
    for target in TARGETS + [["--to", "onnx"]]:
        proc = cli("convert", src, *target, "-o", tmp_path / "out" / ("m.onnx" if "onnx" in target else "m"))
        assert_one_line_error(proc, r"tensor emb.weight \(record data/0\) do not match the CRC-32")
    assert_one_line_error(cli("run", src, "--tokens", "2"), "do not match the CRC-32")
    assert digest(src) == before and not list((tmp_path / "out").iterdir())
    pip_file = tmp_path / "p.pth"
    assert cli("convert", fixture_path("v6", directory=fixture_dir), "--to", "pip", "--strategy", "cpu fp32i8",
               "-o", pip_file).returncode == 0
    flip_bits(pip_file, zip_record_start(pip_file, 3) + 5, 1)
    assert_one_line_error(cli("run", pip_file, "--tokens", "2"), "do not match the CRC-32")


def alter_one_matrix(out: Path) -> None:
    """The exponent bits of 64 values of layer 2's attention output matrix, in place."""
    if out.suffix == ".onnx":  # the weights live in the data file beside the graphs
        import onnx

        tensor = next(t for t in onnx.load(str(out), load_external_data=False).graph.initializer
                      if t.name == "blocks.2.att.output.weight")
        start, width = int({e.key: e.value for e in tensor.external_data}["offset"]), 4
        out = out.with_name(out.name + ".data")
    elif out.suffix == ".gguf":
        from gguf import GGUFReader

        tensor = next(t for t in GGUFReader(out).tensors if t.name == "blk.2.time_mix_output.weight")
        start, width = tensor.data_offset, tensor.data.dtype.itemsize
    else:
        from rwkv_convert.formats.safetensors_io import read_header

        entries, _, data_start = read_header(out)
        dtype, _, begin, _ = entries["blocks.2.att.output.weight"]
        start, width = data_start + begin, {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 1)
    for i in range(64):  # the top byte of each value: its exponent
        flip_bits(out, start + i * width + width - 1, 1, mask=0x08)


@pytest.mark.slow
def test_verify_catches_altered_data_in_files_without_checksums(fixture_dir, tmp_path):
    """Safetensors files of other tools (and GGUFs of other writers) store no checksum: an altered matrix fails
    verify."""
    from safetensors.torch import save_file

    src = fixture_path("v6", directory=fixture_dir)
    foreign = tmp_path / "blinkdl.safetensors"
    save_file(torch.load(src, weights_only=True), str(foreign))
    alter_one_matrix(foreign)
    proc = cli("verify", foreign, "--reference", src, "--tokens", "16")
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "Traceback" not in proc.stderr, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("target", [["--to", "gguf"], ["--to", "safetensors", "--layout", "web-rwkv"],
                                    ["--to", "safetensors", "--layout", "prepared"], ["--to", "onnx"]],
                         ids=lambda t: t[-1])
def test_our_exports_carry_checksums_that_refuse_altered_data(target, fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    out = tmp_path / {"gguf": "m.gguf", "onnx": "m.onnx"}.get(target[1], "m.st")
    assert cli("convert", src, *target, "-o", out).returncode == 0
    alter_one_matrix(out)
    name = {"gguf": "tensor blk.2.time_mix_output.weight", "onnx": "weight blocks.2.att.output.weight"}.get(
        target[1], "tensor 'blocks.2.att.output.weight'")
    runners = ("native",) if target[1] == "onnx" else ("native", "ours")  # onnxruntime is the only ONNX runner
    for runner in runners:
        assert_one_line_error(cli("verify", out, "--reference", src, "--tokens", "16", "--runner", runner),
                              f"{re.escape(name)} do not match the CRC-32 stored")
    assert_one_line_error(cli("run", out, "--tokens", "2"), "do not match the CRC-32 stored")


def mounted_tmpfs(path: Path, options: str):
    """A tmpfs mounted at path (root only): a real read-only or full file system. None where it cannot be."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        return None
    return path


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs; without the rights to mount one, a directory this (non-root) user cannot write."""
    path = mounted_tmpfs(tmp_path / "ro", "ro,size=1m")
    if path is None:
        import os

        if os.geteuid() == 0:
            pytest.skip("cannot mount a tmpfs here, and root writes to any directory")
        path = tmp_path / "ro"
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def full_dir(tmp_path):
    """A 256 KiB tmpfs: every conversion of the fixture runs out of space part-way."""
    path = mounted_tmpfs(tmp_path / "full", "size=256k")
    if path is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", str(path)], check=True)


WRITERS = TARGETS + [["--to", "onnx"], ["--to", "safetensors", "--layout", "hf"]]


@pytest.mark.slow
def test_every_writer_on_a_read_only_or_full_file_system_is_one_line_and_leaves_nothing(
        fixture_dir, read_only_dir, full_dir, tmp_path):
    v6, src = fixture_path("v6", directory=fixture_dir), fixture_path("v7", directory=fixture_dir)
    before = digest(v6), digest(src)
    for target in WRITERS:
        name = "m.onnx" if "onnx" in target else "hf" if "hf" in target else "m"
        src = fixture_path("v7" if "hf" in target else "v6", directory=fixture_dir)  # hf: v4/v7; pip: v4-v6
        assert_one_line_error(cli("convert", src, *target, "-o", read_only_dir / name),
                              r"the directory .* (is on a read-only file system|is not writable)")
        assert_one_line_error(cli("convert", src, *target, "-o", full_dir / name),
                              r"No space left on device|is the disk full\?")
        assert list(full_dir.iterdir()) == []
    assert_one_line_error(cli("make-fixture", "v7", "-o", read_only_dir), "read-only file system|not writable")
    assert_one_line_error(cli("make-fixture", "v7", "-o", full_dir), "No space left on device")
    proc = cli("verify", src, "--reference", src, "--tokens", "4", "--json-out", read_only_dir / "r.json")
    assert_one_line_error(proc, "read-only file system|not writable")
    assert "PASS" not in proc.stdout  # refused before the run
    assert list(full_dir.iterdir()) == [] and (digest(v6), digest(src)) == before
