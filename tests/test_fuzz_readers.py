"""Property: no corruption of a checkpoint makes a reader trace back or return other weights than the file's.
Every corrupted file is either refused with one RwkvConvertError or read back to exactly the original tensors
(a change that does not touch what a conversion uses, e.g. a metadata string). Corruptions: truncation at any
offset, byte flips anywhere (a .pth's data is covered by its zip CRC-32s; our GGUF, safetensors and ONNX files
by the CRC-32s we store) or in the header (other tools' safetensors store no checksum of their data; verify is
what catches altered data there, see test_faults), non-float dtypes, changed shapes, missing and extra tensors.
500 examples per reader."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rwkv_convert
from rwkv_convert.errors import RwkvConvertError
from rwkv_convert.fixtures import make_state_dict
from rwkv_convert.formats.registry import read_checkpoint
from rwkv_convert.formats.safetensors_io import read_header

from .conftest import save_atomic

EXAMPLES = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    database=None)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, tuple[Path, dict, int]]:
    """format -> (file, its tensors as read, where its data starts): small v6 and v7 models."""
    folder = tmp_path_factory.mktemp("fuzz")
    v6 = make_state_dict("v6", n_layer=2, n_embd=64, vocab=320)  # at least 257: GGUF holds a byte-level vocabulary
    src = save_atomic(v6, folder / "v6.pth")
    files = {"pth": src}
    files["web-rwkv"] = rwkv_convert.convert(src, "safetensors", folder / "m.st", layout="web-rwkv")[0]
    files["gguf"] = rwkv_convert.convert(src, "gguf", folder / "m.gguf", quant="f32")[0]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in v6.items()}, str(folder / "blinkdl.safetensors"))
    files["safetensors"] = folder / "blinkdl.safetensors"
    found = {}
    for name, path in files.items():
        ckpt = read_checkpoint(path)
        tensors = {k: ckpt.tensors[k].clone() for k in ckpt.tensors if k not in ckpt.unused_keys}
        if name == "safetensors":  # written by the safetensors library: no checksum of its data
            start = read_header(path)[2]
        else:  # every byte is checked: a .pth by zip and pickle and its CRC-32s, our files by the CRC-32s we store
            start = 0
        found[name] = (path, tensors, start)
    return found


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = read_checkpoint(path)
        return {k: ckpt.tensors[k] for k in ckpt.tensors if k not in ckpt.unused_keys}


def refused_or_unchanged(path: Path, original: dict[str, torch.Tensor]) -> None:
    try:
        got = read_all(path)
    except RwkvConvertError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return
    assert got.keys() == original.keys(), "a corrupted file read back with other tensors"
    for k, v in original.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), f"{k} changed silently"


def byte_corruptions(size: int, start: int):
    truncate = st.integers(0, size - 1).map(lambda n: ("truncate", n, 0))
    header = st.tuples(st.just("flip"), st.integers(0, max(start, 1) - 1), st.integers(1, 255))
    anywhere = st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(1, 255))
    return st.one_of(truncate, header if start else anywhere)


def apply(original: Path, target: Path, corruption) -> None:
    kind, offset, mask = corruption
    data = bytearray(original.read_bytes())
    if kind == "truncate":
        data = data[:offset]
    else:
        data[offset] ^= mask
    target.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pth", "safetensors", "web-rwkv", "gguf"])
def test_byte_corruptions_are_refused_or_harmless(fmt, originals, tmp_path):
    path, tensors, start = originals[fmt]
    size = path.stat().st_size

    @EXAMPLES
    @given(corruption=byte_corruptions(size, start))
    @example(corruption=("flip", 614, 1))  # found: the GGUF's rescale_every_n_layers 0 -> 1 halved some weights
    def check(corruption):
        damaged = tmp_path / f"damaged{path.suffix}"
        apply(path, damaged, corruption)
        refused_or_unchanged(damaged, tensors)

    check()


def structural_changes(keys: list[str]):
    key = st.sampled_from(keys)
    return st.one_of(
        st.tuples(st.just("dtype"), key, st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8])),
        st.tuples(st.just("shape"), key, st.sampled_from(["flatten", "transpose", "drop-row", "add-dim"])),
        st.tuples(st.just("missing"), key, st.none()),
        st.tuples(st.just("extra"), st.text(min_size=1, max_size=20), st.integers(0, 3)),
    )


def change(sd: dict[str, torch.Tensor], edit) -> tuple[dict[str, torch.Tensor], bool]:
    """(changed dict, whether the result is still the same model: an extra key is ignored, unless it sits in
    RWKV's own namespace, where it is a part of the model the reader does not know and must refuse)."""
    kind, key, arg = edit
    sd = dict(sd)
    if kind == "dtype":
        sd[key] = (sd[key] * 10).to(arg)
    elif kind == "shape":
        t = sd[key]
        sd[key] = {"flatten": lambda: t.reshape(-1) if t.ndim > 1 else t.reshape(1, -1),
                   "transpose": lambda: t.t().contiguous() if t.ndim == 2 and t.shape[0] != t.shape[1]
                   else t.unsqueeze(0), "drop-row": lambda: t[1:] if t.shape[0] > 1 else t.unsqueeze(-1),
                   "add-dim": lambda: t.unsqueeze(0)}[arg]()
    elif kind == "missing":
        del sd[key]
    else:
        new_key = key if key not in sd else key + "_x"
        sd[new_key] = torch.zeros(arg + 1)
        return sd, not new_key.startswith(("blocks.", "emb.", "head.", "ln_out."))
    return sd, False


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fuzz-hf")
    # 257 ids: a byte-level vocabulary (fewer have no tokenizer of ours to ship)
    src = save_atomic(make_state_dict("v7", n_layer=3, n_embd=64, vocab=257), folder / "v7.pth")
    rwkv_convert.convert(src, "safetensors", folder / "hf", layout="hf")
    return folder / "hf", read_all(folder / "hf")


@pytest.mark.slow
@pytest.mark.parametrize("part", ["config.json", "model.safetensors"])
def test_hf_directory_corruptions_are_refused_or_harmless(part, hf_dir, tmp_path):
    hf, tensors = hf_dir
    target = hf / part
    size, start = target.stat().st_size, 0  # our model.safetensors carries CRC-32s of its tensors

    @EXAMPLES
    @given(corruption=byte_corruptions(size, start))
    def check(corruption):
        damaged = tmp_path / "hf"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(hf, damaged)
        apply(target, damaged / part, corruption)
        refused_or_unchanged(damaged, tensors)

    check()


@pytest.fixture(scope="module")
def runnable_files(originals, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor, int]]:
    """Files that load as a runnable model (pip-converted, prepared): (file, its logits on TOKENS, data start)."""
    folder = tmp_path_factory.mktemp("fuzz-run")
    src = originals["pth"][0]
    pip_file = rwkv_convert.convert(src, "pip", folder / "i8.pth", strategy="cpu fp32i8")[0]
    prepared = rwkv_convert.convert(src, "safetensors", folder / "p.st", layout="prepared", strategy="cpu fp32i8")[0]
    return {"pip": (pip_file, logits_of(pip_file), 0), "prepared": (prepared, logits_of(prepared), 0)}


TOKENS = [1, 17, 250, 3]


def logits_of(path: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rwkv_convert.load(path).forward(TOKENS, full_output=True)[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pip", "prepared"])
def test_corrupted_runnable_files_are_refused_or_run_as_before(fmt, runnable_files, tmp_path):
    path, logits, start = runnable_files[fmt]

    @EXAMPLES
    @given(corruption=byte_corruptions(path.stat().st_size, start))
    @example(corruption=("flip", 175, 1))  # found in CI: the prepared header's spec said 3 layers, not 2
    def check(corruption):
        damaged = tmp_path / path.name
        apply(path, damaged, corruption)
        try:
            got = logits_of(damaged)
        except RwkvConvertError as e:
            assert "\n" not in str(e) and str(e), repr(e)
            return
        assert torch.equal(got, logits), "a corrupted file ran with other outputs"

    check()


@pytest.fixture(scope="module")
def onnx_exports(originals, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Two ONNX exports of the v6 model: both graphs with their weights in m.onnx.data, and one graph holding
    its weights inline; (folder, logits on TOKENS)."""
    src, found = originals["pth"][0], {}
    for kind, options in (("external", {}), ("inline", {"graphs": "sequence", "external_data": False})):
        folder = tmp_path_factory.mktemp(f"fuzz-onnx-{kind}")
        rwkv_convert.convert(src, "onnx", folder / "m.onnx", **options)
        found[kind] = folder, logits_of(folder / "m.onnx")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("export,part", [("external", "m.onnx"), ("external", "m.seq.onnx"),
                                         ("external", "m.onnx.data"), ("inline", "m.onnx")])
def test_corrupted_onnx_exports_are_refused_or_run_as_before(export, part, onnx_exports, tmp_path):
    """onnxruntime runs altered weights as they are; the CRC-32s our exports carry (checked before it loads
    them) are what refuses them."""
    folder, logits = onnx_exports[export]

    @EXAMPLES
    @given(corruption=byte_corruptions((folder / part).stat().st_size, 0))
    @example(corruption=("truncate", 24871, 0))  # found in CI: m.onnx cut inside its metadata, checksum entry gone
    def check(corruption):
        damaged = tmp_path / "export"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(folder, damaged)
        apply(folder / part, damaged / part, corruption)
        try:
            got = logits_of(damaged / "m.onnx")
        except RwkvConvertError as e:
            assert "\n" not in str(e) and str(e), repr(e)
            return
        assert torch.equal(got, logits), "a corrupted export ran with other outputs"

    check()


@pytest.mark.slow
def test_changed_dtypes_shapes_and_keys_are_refused_or_harmless(originals, tmp_path):
    path, tensors, _ = originals["pth"]
    sd = torch.load(path, weights_only=True)

    @EXAMPLES
    @given(edit=structural_changes(sorted(tensors)))
    def check(edit):
        changed, same_model = change(sd, edit)
        damaged = save_atomic(changed, tmp_path / "changed.pth")
        try:
            got = read_all(damaged)
        except RwkvConvertError:
            assert not same_model, f"{edit}: a file with an extra key is still the model"
            return
        # read: only right if it is the same model (an extra key, or a shape the format allows, e.g. [1, 1, C]
        # for a [C] vector, holding the same values)
        assert same_model or edit[0] != "extra", f"{edit}: an unknown tensor in the model's namespace was read"
        assert got.keys() == tensors.keys(), f"{edit} was read with other tensors"
        for k, v in tensors.items():
            assert torch.equal(got[k].reshape(v.shape), v) and got[k].numel() == v.numel(), f"{edit} changed {k}"

    check()


@pytest.mark.slow
def test_a_copy_with_nothing_changed_reads_back_exactly(originals, tmp_path):
    for path, tensors, _ in originals.values():  # the property's other half: an intact file is never refused
        copy = tmp_path / path.name
        shutil.copyfile(path, copy)
        refused_or_unchanged(copy, tensors)
        assert read_all(copy).keys() == tensors.keys()


def test_a_prepared_file_whose_header_metadata_was_altered_is_refused(originals, tmp_path):
    path = rwkv_convert.convert(originals["pth"][0], "safetensors", tmp_path / "p.st", layout="prepared")[0]
    data = path.read_bytes()
    spec = b'n_layer\\": 2'
    assert data.count(spec) == 1
    (tmp_path / "bad.st").write_bytes(data.replace(spec, b'n_layer\\": 3'))  # the JSON stays valid
    with pytest.raises(RwkvConvertError, match="its metadata .* is not what was written") as e:
        rwkv_convert.load(tmp_path / "bad.st")
    assert "\n" not in str(e.value)


def test_an_onnx_export_missing_its_metadata_is_refused_in_one_line(originals, tmp_path):
    """As a file cut inside its metadata leaves it: the checksum entry gone with the keys after the cut."""
    import onnx

    rwkv_convert.convert(originals["pth"][0], "onnx", tmp_path / "m.onnx", graphs="sequence")
    model = onnx.load(str(tmp_path / "m.onnx"))
    for prop in [p for p in model.metadata_props if p.key in ("rwkv.dtype", "rwkv.checksums")]:
        model.metadata_props.remove(prop)
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(RwkvConvertError, match="damaged ONNX export.*rwkv.dtype") as e:
        rwkv_convert.load(tmp_path / "m.onnx")
    assert "\n" not in str(e.value)
