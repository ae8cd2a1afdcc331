"""State-tuning files (blocks.i.att.time_state only) applied to a base model with --state: in our runner, the pip
package (v5/v6, which loads state-tuned files), ONNX and prepared files; convert-state's three forms; mismatches
and formats without an initial state refused in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import rwkv_convert
from rwkv_convert.fixtures import fixture_path
from rwkv_convert.runtimes.pip_package import run_in_pip_package
from rwkv_convert.state_file import read_state
from rwkv_convert.verify import run_ours, verify

from .conftest import SPLIT, save_atomic, tokens_for
from .test_cli import assert_one_line_error, cli
from .test_reference_runner import FP32_BOUND, assert_matches


def make_state(spec, seed: int, n_layer: int | None = None, head_size: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    N = head_size or spec.head_size
    H = spec.n_embd // N
    return {f"blocks.{i}.att.time_state": torch.randn(H, N, N, generator=g) * 0.3
            for i in range(n_layer or spec.n_layer)}


@pytest.fixture(scope="module")
def tuned(fixture_dir, tmp_path_factory):
    """Per version: (base checkpoint, its state file, the same model with the state merged into the file)."""
    out = tmp_path_factory.mktemp("states")
    files = {}
    for version in ("v6", "v7"):
        base = fixture_path(version, directory=fixture_dir)
        sd = torch.load(base, weights_only=True)
        state = make_state(rwkv_convert.read_checkpoint(base).spec, seed=len(files) + 7)
        files[version] = (base, save_atomic(state, out / f"{version}-state.pth"),
                          save_atomic({**sd, **state}, out / f"{version}-merged.pth"))
    return files


@pytest.mark.parametrize("version", ["v6", "v7"])
def test_a_state_file_is_the_same_as_a_state_tuned_checkpoint(version, tuned):
    base, state, merged = tuned[version]
    tokens = tokens_for(512)
    with_state = run_ours(rwkv_convert.load(base, state=state), tokens, SPLIT)
    assert_matches(with_state, run_ours(rwkv_convert.load(merged), tokens, SPLIT), 0.0)
    plain = rwkv_convert.load(base).forward(tokens[:8], full_output=True)[0]
    assert (with_state["seq"][:8] - plain).abs().max().item() > 0.05  # the state changes what the model says


def test_v6_state_matches_the_pip_package(tuned):
    base, state, merged = tuned["v6"]
    tokens = tokens_for(512)
    ref = run_in_pip_package([{"path": str(merged), "strategy": "cpu fp32", "tokens": tokens, "split": SPLIT}])[0]
    assert_matches(run_ours(rwkv_convert.load(base, state=state), tokens, SPLIT), ref, FP32_BOUND)


def test_v7_state_is_the_initial_wkv_as_stored(tuned):
    """The pip package's v7 ignores time_state, so v7's layout is checked by its definition: the file's
    [head, value, key] matrices are v7's wkv state as they are (v5/v6 are transposed, as the package does)."""
    base, state, _ = tuned["v7"]
    tokens = tokens_for(512)
    model = rwkv_convert.load(base)
    start = model.init_state()
    stored = torch.load(state, weights_only=True)
    for i in range(model.spec.n_layer):
        start[3 * i + 1] = stored[f"blocks.{i}.att.time_state"]
    assert torch.equal(rwkv_convert.load(base, state=state).forward(tokens)[0], model.forward(tokens, start)[0])


@pytest.mark.parametrize("version", ["v6", "v7"])
@pytest.mark.parametrize("to, name, options", [("onnx", "m.onnx", {}), ("safetensors", "m.st", {"layout": "prepared"})])
def test_exports_carry_the_state(version, to, name, options, tuned, tmp_path):
    base, state, _ = tuned[version]
    written = rwkv_convert.convert(base, to, tmp_path / name, state=state, **options)
    report = verify(written[0], base, tokens=32, state=state)
    assert report.passed, report.worst
    assert not verify(written[0], base, tokens=32).passed  # without the state the reference is another model


def test_pip_format_carries_a_v6_state(tuned, tmp_path):
    base, state, _ = tuned["v6"]
    out = tmp_path / "pip.pth"
    rwkv_convert.convert(base, "pip", out, state=state, strategy="cpu fp32")
    report = verify(out, base, tokens=32, state=state)  # run in the rwkv pip package itself
    assert report.passed and "pip package" in report.runner, (report.runner, report.worst)


def test_mismatched_state_files_are_one_line(tuned, fixture_dir, tmp_path):
    base6, state6, _ = tuned["v6"]
    base7, _, _ = tuned["v7"]
    spec = rwkv_convert.read_checkpoint(base7).spec
    short = save_atomic(make_state(spec, 1, n_layer=3), tmp_path / "short.pth")
    narrow = save_atomic(make_state(spec, 1, head_size=32), tmp_path / "narrow.pth")
    mixed = save_atomic({**make_state(spec, 1), "blocks.0.att.key.weight": torch.zeros(128, 128)},
                        tmp_path / "mixed.pth")
    out = tmp_path / "out.onnx"
    for state, pattern in ((short, r"a state of 3 layers of \[2, 64, 64\], and .* needs 7 layers of \[2, 64, 64\]"),
                           (narrow, r"4, 32, 32\].*needs 7 layers of \[2, 64, 64\] \(n_head=2, head_size=64\)"),
                           (mixed, "blocks.0.att.key.weight is not part of a state file")):
        for args in (["run", base7, "--tokens", "2"], ["convert", base7, "--to", "onnx", "-o", out],
                     ["verify", base7, "--reference", base7, "--tokens", "4"],
                     ["quality", base7, "--schemes", "fp32", "--max-bytes", "200"]):
            assert_one_line_error(cli(*args, "--state", state), pattern)
    assert not out.exists() and not list(tmp_path.glob("out.onnx*"))
    v4 = fixture_path("v4", directory=fixture_dir)
    assert_one_line_error(cli("run", v4, "--state", state6, "--tokens", "2"), "RWKV-4, which has no matrix state")
    prepared = tmp_path / "p.st"
    rwkv_convert.convert(base6, "safetensors", prepared, layout="prepared")
    assert_one_line_error(cli("run", prepared, "--state", state6, "--tokens", "2"),
                          "--state applies to original weights; .* give --state to convert instead")


def test_formats_without_an_initial_state_refuse_and_point_to_the_routes_that_work(tuned, tmp_path):
    base, state, _ = tuned["v7"]
    proc = cli("convert", base, "--state", state, "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert_one_line_error(proc, "llama.cpp's GGUF has no initial-state field.*--to onnx or --to prepared")
    assert not (tmp_path / "m.gguf").exists()
    proc = cli("convert", base, "--state", state, "--to", "safetensors", "--layout", "hf", "-o", tmp_path / "hf")
    assert_one_line_error(proc, "state-tuned")


def test_convert_state_writes_each_form_and_reads_them_back(tuned, tmp_path):
    base, state, _ = tuned["v6"]
    stored = torch.load(state, weights_only=True)
    outputs = {}
    for layout, name in (("pth", "s.pth"), ("safetensors", "s.safetensors"), ("web-rwkv", "s.st")):
        outputs[layout] = tmp_path / name
        proc = cli("convert-state", state, "--to", layout, "-o", outputs[layout], "--model", base)
        assert proc.returncode == 0, proc.stderr
        back = read_state(outputs[layout])
        bound = 2e-3 if layout == "web-rwkv" else 0.0  # F16
        for i, t in enumerate(back.layers):
            assert (t - stored[f"blocks.{i}.att.time_state"]).abs().max().item() <= bound
    with safe_open(str(outputs["web-rwkv"]), framework="pt") as f:  # F16 and [head, key, value]
        t = f.get_tensor("blocks.2.att.time_state")
    assert t.dtype == torch.float16
    assert torch.equal(t, stored["blocks.2.att.time_state"].transpose(1, 2).half())
    assert torch.equal(torch.load(outputs["pth"], weights_only=True)["blocks.0.att.time_state"],
                       stored["blocks.0.att.time_state"])
    # every form applies the same state
    tokens = tokens_for(512)[:16]
    want = rwkv_convert.load(base, state=state).forward(tokens)[0]
    for path in outputs.values():
        assert (rwkv_convert.load(base, state=path).forward(tokens)[0] - want).abs().max().item() <= 1e-2
    base7 = tuned["v7"][0]
    other = read_state(state)
    assert other.shape == (2, 64, 64)
    proc = cli("convert-state", tuned["v7"][1], "--to", "pth", "-o", tmp_path / "x.pth",
               "--model", fixture_path("v5.2", n_layer=3, directory=tmp_path))
    assert_one_line_error(proc, "needs 3 layers")
    assert not (tmp_path / "x.pth").exists()
    assert cli("convert-state", state, "--to", "pth", "-o", tmp_path / "y.pth", "--model", base7).returncode == 0


def test_run_starts_from_the_state(tuned):
    base, state, _ = tuned["v7"]
    proc = cli("run", base, "--state", state, "--tokens", "3", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
