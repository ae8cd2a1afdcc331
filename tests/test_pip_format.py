"""`convert --to pip`: files in the rwkv pip package's converted format, checked in the package itself."""

from __future__ import annotations

import pytest
import torch

import rwkv_convert
from rwkv_convert.fixtures import fixture_path, make_state_dict
from rwkv_convert.runtimes.pip_package import run_in_pip_package

from .conftest import save_atomic, tokens_for

pytestmark = pytest.mark.slow  # every test runs the rwkv package in subprocesses

V4_TO_V6 = ["v4", "v5.0", "v5.1", "v5.2", "v5.2-state", "v6"]
INT8_STRATEGIES = ["cpu fp16i8", "cpu fp32i8", "cpu bf16i8"]
RUN_STRATEGIES = ["cpu fp32", "cpu fp32i8", "cpu fp32i8 *3 -> cpu fp32", "cpu bf16"]


@pytest.fixture(scope="module")
def package_results(fixture_dir, tmp_path_factory):
    """One batch for the package: its own int8 conversions, and runs of our files and of the sources."""
    out = tmp_path_factory.mktemp("pip-format")
    jobs, names = [], []
    tokens = tokens_for(512)[:24]
    for variant in V4_TO_V6:
        for dtype in ("fp32", "bf16"):
            src = str(fixture_path(variant, dtype, directory=fixture_dir))
            for strategy in INT8_STRATEGIES:
                target = str(out / f"pkg-{variant}-{dtype}-{strategy.replace(' ', '_')}.pth")
                names.append(("pkg-convert", variant, dtype, strategy))
                jobs.append({"kind": "convert", "path": src, "strategy": strategy, "out": target, "tokens": [],
                             "split": 0})
        src = fixture_path(variant, "fp32", directory=fixture_dir)
        for strategy in RUN_STRATEGIES:
            (ours,) = rwkv_convert.convert(src, "pip", out / f"ours-{variant}-{strategy.replace(' ', '_')}.pth",
                                           strategy=strategy)
            for kind, path in (("ours", ours), ("source", src)):
                names.append((kind, variant, "fp32", strategy))
                jobs.append({"kind": "quick", "path": str(path), "strategy": strategy, "tokens": tokens, "split": 0})
    # The package's own converted v6 file, loaded back in the package.
    own_v6 = str(out / "pkg-v6-fp32-cpu_fp32i8.pth")
    names.append(("pkg-own-v6", "v6", "fp32", "cpu fp32i8"))
    jobs.append({"kind": "quick", "path": own_v6, "strategy": "cpu fp32i8", "tokens": tokens, "split": 0})
    return out, dict(zip(names, run_in_pip_package(jobs), strict=True))


@pytest.mark.parametrize("variant", V4_TO_V6)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy", INT8_STRATEGIES)
def test_converted_tensors_are_bit_identical_to_the_package(variant, dtype, strategy, package_results,
                                                            fixture_dir):
    out, results = package_results
    assert results[("pkg-convert", variant, dtype, strategy)] == {"ok": True}
    theirs = torch.load(out / f"pkg-{variant}-{dtype}-{strategy.replace(' ', '_')}.pth", weights_only=True)
    (ours_path,) = rwkv_convert.convert(fixture_path(variant, dtype, directory=fixture_dir), "pip",
                                        out / f"bits-{variant}-{dtype}-{strategy.replace(' ', '_')}.pth",
                                        strategy=strategy)
    ours = torch.load(ours_path, weights_only=True)
    # The one deliberate rename: we keep `time_faaaa` so that the package can load v6 files.
    ours = {k.replace(".time_faaaa", ".time_first"): v for k, v in ours.items()}
    assert set(ours) == set(theirs)
    int8_keys = 0
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype, key
            assert ours[key].shape == value.shape, key
            assert torch.equal(ours[key], value), key
            int8_keys += value.dtype == torch.uint8
        else:
            assert ours[key] == value, key
    assert int8_keys > 0


@pytest.mark.parametrize("variant", V4_TO_V6)
@pytest.mark.parametrize("strategy", RUN_STRATEGIES)
def test_converted_file_runs_in_the_package_like_its_own_load(variant, strategy, package_results):
    _, results = package_results
    ours, source = results[("ours", variant, "fp32", strategy)], results[("source", variant, "fp32", strategy)]
    assert "error" not in ours, ours.get("error")
    assert torch.equal(ours["seq"], source["seq"])
    for a, b in zip(ours["seq_state"], source["seq_state"], strict=True):
        assert torch.equal(a, b)


def test_the_packages_own_v6_files_do_not_load_in_the_package(package_results):
    """Why our v6 files keep `time_faaaa`: the package renames it and then never sets n_head."""
    _, results = package_results
    assert "n_head" in results[("pkg-own-v6", "v6", "fp32", "cpu fp32i8")].get("error", "")


def test_v7_is_refused_with_one_line(fixture_dir, tmp_path):
    from rwkv_convert.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="cannot load converted RWKV-7 files"):
        rwkv_convert.convert(fixture_path("v7", directory=fixture_dir), "pip", tmp_path / "x.pth")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", V4_TO_V6)
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8 *3 -> cpu fp32", "cpu bf16i8"])
def test_our_reader_runs_converted_files_like_the_original(variant, strategy, fixture_dir, tmp_path):

    src = fixture_path(variant, directory=fixture_dir)
    (out,) = rwkv_convert.convert(src, "pip", tmp_path / "c.pth", strategy=strategy)
    model = rwkv_convert.load(out)
    assert str(model.strategy) == strategy and model.passes[0] == "pip-converted file"
    tokens = list(range(2, 26))
    expected = rwkv_convert.load(src, strategy).forward(tokens, full_output=True)[0]
    assert torch.equal(model.forward(tokens, full_output=True)[0], expected)
    with pytest.raises(rwkv_convert.RwkvConvertError, match="was converted for"):
        rwkv_convert.load(out, "cpu fp16")
    with pytest.raises(rwkv_convert.RwkvConvertError, match="not an original checkpoint"):
        rwkv_convert.read_checkpoint(out)


def test_verify_with_our_reader(fixture_dir, tmp_path):
    from rwkv_convert.verify import verify

    src = fixture_path("v6", "bf16", directory=fixture_dir)
    (out,) = rwkv_convert.convert(src, "pip", tmp_path / "c.pth", strategy="cpu fp16i8")
    ours, native = verify(out, src, tokens=16, runner="ours"), verify(out, src, tokens=16)
    assert ours.passed and native.passed
    assert "reading a pip-converted file" in ours.runner and "rwkv pip package" in native.runner


@pytest.mark.parametrize("variant", ["v5.1", "v5.2", "v6"])
def test_a_pip_file_of_a_one_head_model_reads_back(variant, tmp_path):
    """Per-head tensors are stored [H, N, 1]: with one head, squeezing them lost H (a traceback on loading)."""
    src = save_atomic(make_state_dict(variant, n_layer=1, n_embd=64, vocab=256), tmp_path / "one-head.pth")
    out = rwkv_convert.convert(src, "pip", tmp_path / "one-head-pip.pth", strategy="cpu fp32")[0]
    expected = rwkv_convert.load(src).forward([1, 2, 3])[0]
    assert torch.equal(rwkv_convert.load(out).forward([1, 2, 3])[0], expected)
