"""Property: whatever the header or metadata of a file says, `rwkv-convert run FILE` ends in exit 0 (the file still
reads as a model) or exit 2 with one line - never a traceback, never more than 60 s, never more than 2 GB of
memory (the commands run in a worker process under RLIMIT_DATA). The mutations go where a reader trusts what it
is told: a .pth's pickle integers (shapes, strides, storage offsets and sizes, with the zip CRC-32 patched so the
pickle is read) and its zip records' sizes and offsets; safetensors' JSON header (dtypes, shapes, offsets, keys);
GGUF key/value and tensor-info fields (lengths, counts, types, dims, offsets, with our metadata CRC-32 resealed
half of the time so the change reaches the reader behind it); ONNX external-data entries and initializer dims.
300 examples per format; a fixed seed in CI (CI=true), a fresh one locally (RWKV_CONVERT_FUZZ_EXAMPLES for more)."""

from __future__ import annotations

import json
import os
import pickletools
import select
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwkv_convert
from rwkv_convert.fixtures import make_state_dict

from .conftest import save_atomic

EXAMPLES = int(os.environ.get("RWKV_CONVERT_FUZZ_EXAMPLES") or 300)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TIME_LIMIT_S = 60
MEMORY_LIMIT = 2 << 30
ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """tests/cli_worker.py under the memory limit; restarted after a hang or a crash."""

    def __init__(self):
        self.proc = None

    def start(self) -> None:
        read, write = os.pipe()

        def limit():
            import resource
            resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))

        self.proc = subprocess.Popen([sys.executable, "-m", "tests.cli_worker", str(write)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     text=True, pass_fds=(write,), preexec_fn=limit)
        os.close(write)
        self.results = os.fdopen(read, "r")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.results.close()
            self.proc = None

    def run(self, *args) -> dict:
        if self.proc is None:
            self.start()
        self.proc.stdin.write(json.dumps([str(a) for a in args]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.results], [], [], TIME_LIMIT_S)
        line = self.results.readline() if ready else None
        if not line:
            self.stop()
            what = f"ran past {TIME_LIMIT_S} s" if not ready else "died (a crash, or killed past the memory limit)"
            raise AssertionError(f"rwkv-convert {' '.join(map(str, args))} {what}")
        return json.loads(line)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


def exits_0_or_2(worker: Worker, path: Path) -> None:
    result = worker.run("run", path, "--tokens", "1", "--prompt", "a")
    assert result["traceback"] is None, result["traceback"]
    assert result["code"] in (0, 2), result
    if result["code"] == 2:
        errors = [line for line in result["stderr"].splitlines() if line.lower().startswith("error")]
        assert len(errors) == 1, result["stderr"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("headers")
    sd = make_state_dict("v6", n_layer=1, n_embd=64, vocab=300)
    src = save_atomic(sd, folder / "v6.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "blinkdl.safetensors"))
    return {"pth": src, "safetensors": folder / "blinkdl.safetensors",
            "web-rwkv": rwkv_convert.convert(src, "safetensors", folder / "m.st", layout="web-rwkv")[0],
            "gguf": rwkv_convert.convert(src, "gguf", folder / "m.gguf", quant="f32")[0],
            "onnx": rwkv_convert.convert(src, "onnx", folder / "m.onnx", graphs="step", external_data=True)[0]}


def interesting_ints(bits: int, signed: bool):
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = [v for v in (0, 1, 2, 3, 7, 64, 255, 256, 4095, 65535, 1 << 20, 1 << 31, 1 << 40, high, low, -1, -2)
             if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def test_the_worker_runs_the_originals(worker, originals):
    for path in originals.values():
        result = worker.run("run", path, "--tokens", "1", "--prompt", "a")
        assert result["code"] == 0, result


# ---- .pth: the pickle's integers and the zip records' fields ---------------------------------------------------

INT_OPCODES = {"BININT1": (1, "<B"), "BININT2": (2, "<H"), "BININT": (4, "<i")}


def pickle_ints(data: bytes) -> list[tuple[int, str]]:
    """(offset of the integer's bytes, struct format) of every fixed-width integer in a pickle."""
    return [(pos + 1, INT_OPCODES[op.name][1]) for op, _, pos in pickletools.genops(data) if op.name in INT_OPCODES]


def central_entries(blob: bytes) -> dict[str, int]:
    """name -> offset of its central directory entry."""
    found, at = {}, blob.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", blob, at + 28)[0]
        found[blob[at + 46:at + 46 + name_len].decode()] = at
        at = blob.find(b"PK\x01\x02", at + 46)
    return found


def replace_member(blob: bytearray, info: zipfile.ZipInfo, start: int, data: bytes, central: int) -> None:
    """The member's bytes replaced by `data` (same length), its CRC-32 patched in both headers."""
    blob[start:start + len(data)] = data
    crc = zlib.crc32(data)
    struct.pack_into("<I", blob, info.header_offset + 14, crc)
    struct.pack_into("<I", blob, central + 16, crc)


@pytest.fixture(scope="module")
def pth_layout(originals):
    path = originals["pth"]
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        pkl = next(i for i in infos if i.filename.endswith("data.pkl"))
        data = archive.read(pkl)
    name_len, extra_len = struct.unpack_from("<HH", blob, pkl.header_offset + 26)
    start = pkl.header_offset + 30 + name_len + extra_len
    return blob, infos, pkl, data, start, central_entries(blob), pickle_ints(data)


@FUZZ
@given(st.data())
def test_pth_pickle_and_zip_fields(worker, pth_layout, tmp_path, data):
    blob, infos, pkl, pickled, start, central, ints = pth_layout
    out = bytearray(blob)
    if data.draw(st.booleans(), label="pickle"):
        changed = bytearray(pickled)
        for _ in range(data.draw(st.integers(1, 3), label="how many")):
            at, fmt = data.draw(st.sampled_from(ints), label="integer")
            size = struct.calcsize(fmt)
            struct.pack_into(fmt, changed, at, data.draw(interesting_ints(8 * size, fmt == "<i"), label="value"))
        replace_member(out, pkl, start, bytes(changed), central[pkl.filename])
    else:
        info = data.draw(st.sampled_from(infos), label="record")
        field, header = data.draw(st.sampled_from([(18, "local"), (22, "local"), (20, "central"), (24, "central"),
                                                   (42, "central"), (26, "local"), (28, "local")]), label="field")
        at = (info.header_offset if header == "local" else central[info.filename]) + field
        width = 2 if (header, field) in (("local", 26), ("local", 28)) else 4
        struct.pack_into("<H" if width == 2 else "<I", out, at, data.draw(interesting_ints(8 * width, False)))
    path = tmp_path / "m.pth"
    path.write_bytes(out)
    exits_0_or_2(worker, path)


# ---- safetensors: the JSON header ---------------------------------------------------------------------------------

def split_safetensors(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    n = struct.unpack_from("<Q", blob)[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X", "", "f32"]


@pytest.mark.parametrize("fmt", ["safetensors", "web-rwkv"])
@FUZZ
@given(data=st.data())
def test_safetensors_headers(worker, originals, fmt, tmp_path, data):
    header, body = split_safetensors(originals[fmt])
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3), label="how many")):
        name = data.draw(st.sampled_from(names), label="tensor")
        what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "metadata", "junk"]), label="what")
        entry = header.get(name)
        if not isinstance(entry, dict):  # dropped or made junk by an earlier change
            continue
        if what == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(SAFETENSORS_DTYPES))
        elif what == "shape":
            entry["shape"] = data.draw(st.lists(interesting_ints(63, True), min_size=0, max_size=4))
        elif what == "offsets":
            entry["data_offsets"] = data.draw(st.lists(interesting_ints(64, True), min_size=0, max_size=3))
        elif what == "drop":
            del header[name]
        elif what == "metadata":
            meta = header.setdefault("__metadata__", {})
            key = data.draw(st.sampled_from(sorted(meta) + ["format", "x"]))
            meta[key] = data.draw(st.one_of(st.text(max_size=20), st.integers().map(str)))
        else:
            header[name] = data.draw(st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers())))
    text = json.dumps(header).encode()
    length = len(text) if data.draw(st.booleans(), label="true length") else data.draw(interesting_ints(64, False))
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", length) + text + body)
    exits_0_or_2(worker, path)


# ---- GGUF: key/value and tensor-info fields ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_layout(originals):
    import gguf

    from rwkv_convert.formats.gguf_file import METADATA_CHECKSUM_KEY

    path = originals["gguf"]
    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    numbers = []  # (offset, numpy dtype) of every one-value numeric part: lengths, counts, types, values, dims
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for field in fields:
        for part in field.parts:
            if part.dtype.kind in "iu" and part.size <= 4:
                for k in range(part.size):
                    numbers.append((part.__array_interface__["data"][0] - base + k * part.itemsize, part.dtype))
    meta = reader.fields[METADATA_CHECKSUM_KEY]
    crc_at = meta.parts[meta.data[0]].__array_interface__["data"][0] - base
    blob = path.read_bytes()
    return blob, numbers, crc_at, reader.data_offset


@FUZZ
@given(data=st.data())
def test_gguf_fields(worker, gguf_layout, tmp_path, data):
    blob, numbers, crc_at, data_offset = gguf_layout
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3), label="how many")):
        at, dtype = data.draw(st.sampled_from(numbers), label="field")
        value = data.draw(interesting_ints(8 * dtype.itemsize, dtype.kind == "i"), label="value")
        out[at:at + dtype.itemsize] = np.array([value], dtype=dtype.newbyteorder("<")).tobytes()
    if data.draw(st.booleans(), label="reseal"):  # our metadata CRC made to match, so the change is read on
        section = bytearray(out[:data_offset])
        section[crc_at:crc_at + 4] = bytes(4)
        struct.pack_into("<I", out, crc_at, zlib.crc32(section))
    path = tmp_path / "m.gguf"
    path.write_bytes(out)
    exits_0_or_2(worker, path)


# ---- ONNX: external-data entries and initializer dims --------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_model(originals):
    import onnx

    return onnx.load(str(originals["onnx"]), load_external_data=False)


ENTRY_VALUES = st.one_of(st.sampled_from(["0", "-1", "1.5", "", "1e3", "0x10", " 4", "99999999999999999999", "4096",
                                          "m.onnx.data", "../m.onnx.data", "/etc/passwd", "nope", "m.onnx",
                                          ".", "./m.onnx.data", "m.onnx.data\0x"]),
                         st.integers(0, 1 << 40).map(str), st.text(max_size=12))


@FUZZ
@given(data=st.data())
def test_onnx_external_data(worker, originals, onnx_model, tmp_path, data):
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    if data.draw(st.booleans(), label="drop our checksums"):  # as another tool's file: nothing but the entries
        for p in list(model.metadata_props):
            if p.key == "rwkv.checksums":
                model.metadata_props.remove(p)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for _ in range(data.draw(st.integers(1, 3), label="how many")):
        tensor = data.draw(st.sampled_from(external), label="initializer")
        what = data.draw(st.sampled_from(["location", "offset", "length", "drop", "dims", "type"]), label="what")
        entries = {e.key: e.value for e in tensor.external_data}
        if what in ("location", "offset", "length"):
            entries[what] = data.draw(ENTRY_VALUES, label="value")
        elif what == "drop":
            entries.pop(data.draw(st.sampled_from(sorted(entries))), None)
        elif what == "dims" and len(tensor.dims):
            tensor.dims[data.draw(st.integers(0, len(tensor.dims) - 1))] = data.draw(interesting_ints(63, True))
        elif what == "type":
            tensor.data_type = data.draw(st.integers(0, 30))
        del tensor.external_data[:]
        for k, v in entries.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
    if not (tmp_path / "m.onnx.data").is_file():  # a copy: a link would lead out of the model's folder
        shutil.copyfile(originals["onnx"].parent / "m.onnx.data", tmp_path / "m.onnx.data")
    try:
        serialized = model.SerializeToString()
    except ValueError:  # protobuf refuses some strings itself (not UTF-8): nothing of ours to test
        return
    (tmp_path / "m.onnx").write_bytes(serialized)
    exits_0_or_2(worker, tmp_path / "m.onnx")
