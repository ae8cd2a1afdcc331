"""The reference runner against the `rwkv` pip package (0.8.32) on every fixture version."""

from __future__ import annotations

import pytest
import torch

import rwkv_convert
from rwkv_convert.errors import RwkvConvertError
from rwkv_convert.fixtures import VARIANTS, fixture_path, make_state_dict
from rwkv_convert.runtimes.pip_package import run_in_pip_package
from rwkv_convert.verify import run_ours

from .conftest import ODD_SHAPES, SPLIT, save_atomic, tokens_for

# Same math in fp32; only summation order differs: measured <= 4e-5 with the torch recurrence, <= 6.5e-5 with
# the C recurrences, whose order depends on the CPU's vector width (1.4e-4 without vectorised sums; logits of
# magnitude ~14 through 7 random layers, which amplify rounding; the C kernel's own error against an fp64
# recurrence is no larger than the torch loop's: tests/test_cpu_kernels.py).
FP32_BOUND = 2e-4
# v4-v6 bf16 files: the pip package folds ln0 into emb in bf16, we fold in fp32 (see docs/numerics.md).
# Measured 0.02-0.08 on logits of magnitude ~13; the bound leaves room for other seeds and shapes.
BF16_LN0_FOLD_BOUND = 0.25


def run_three_ways(model, tokens):
    """Sequence, token by token, and SPLIT + rest with the state carried: the modes verify uses too."""
    return run_ours(model, tokens, SPLIT)


def max_diff(a, b) -> float:
    if isinstance(a, list):
        assert len(a) == len(b)
        return max(max_diff(x, y) for x, y in zip(a, b, strict=True))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_matches(ours: dict, ref: dict, bound: float) -> None:
    for mode in ("seq", "one", "split"):
        assert max_diff(ours[mode], ref[mode]) <= bound, f"{mode}: logits differ by {max_diff(ours[mode], ref[mode])}"
        state_diff = max_diff(ours[mode + "_state"], ref[mode + "_state"])
        assert state_diff <= bound, f"{mode}: state differs by {state_diff}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_fixture_matches_pip_package(variant, oracle):
    job = oracle.jobs[f"{variant}/fp32"]
    ours = run_three_ways(rwkv_convert.load(job["path"]), job["tokens"])
    assert_matches(ours, oracle[f"{variant}/fp32"], FP32_BOUND)


@pytest.mark.parametrize("name", list(ODD_SHAPES))
def test_shapes_beyond_the_fixtures_match_pip_package(name, oracle):
    job = oracle.jobs[name]
    ours = run_three_ways(rwkv_convert.load(job["path"]), job["tokens"])
    assert_matches(ours, oracle[name], FP32_BOUND)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("v7")])
def test_bf16_v7_matches_pip_package(variant, oracle):
    # For v7 the package folds ln0 in the target dtype (fp32 here), as we do.
    job = oracle.jobs[f"{variant}/bf16"]
    ours = run_three_ways(rwkv_convert.load(job["path"]), job["tokens"])
    assert_matches(ours, oracle[f"{variant}/bf16"], FP32_BOUND)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("v7")])
def test_bf16_difference_is_only_the_ln0_fold(variant, oracle):
    bf16_job, upcast_job = oracle.jobs[f"{variant}/bf16"], oracle.jobs[f"{variant}/upcast"]
    tokens = bf16_job["tokens"]
    ours_bf16 = run_three_ways(rwkv_convert.load(bf16_job["path"]), tokens)
    ours_upcast = run_three_ways(rwkv_convert.load(upcast_job["path"]), tokens)
    # We compute in fp32 from the bf16 values: identical to running the same values stored as fp32 ...
    assert_matches(ours_bf16, ours_upcast, 0.0)
    # ... which the package matches when it too folds ln0 in fp32 (an fp32 file) ...
    assert_matches(ours_upcast, oracle[f"{variant}/upcast"], FP32_BOUND)
    # ... so the whole difference on the bf16 file is its bf16-rounded ln0 fold, and it is bounded.
    ref = oracle[f"{variant}/bf16"]
    diff = max(max_diff(ours_bf16[m], ref[m]) for m in ("seq", "one", "split"))
    assert 0 < diff <= BF16_LN0_FOLD_BOUND


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("v7")])
def test_package_ln0_fold_reproduces_the_package_on_bf16_files(variant, oracle):
    """--ln0-fold package folds in the file's dtype, as the pip package does: the bf16 difference is gone."""
    bf16_job = oracle.jobs[f"{variant}/bf16"]
    ours = run_three_ways(rwkv_convert.load(bf16_job["path"], ln0_fold="package"), bf16_job["tokens"])
    assert_matches(ours, oracle[f"{variant}/bf16"], FP32_BOUND)


@pytest.mark.parametrize("version", ["v4", "v5.2", "v6", "v7"])
def test_fp16_files_ln0_fold_default_and_package(version, tmp_path):
    """fp16 files (docs/numerics.md): our fp32 fold differs from the package's by fp16 rounding of the table
    (v4-v6); the package fold matches it as fp32 files do. v7: the package folds in the strategy's dtype,
    which at cpu fp32 is ours."""
    sd = {k: v.half() for k, v in make_state_dict(version, n_layer=2, n_embd=128, vocab=512).items()}
    path = save_atomic(sd, tmp_path / f"{version}-fp16.pth")
    tokens = tokens_for(512)[:24]
    pip = run_in_pip_package([{"path": str(path), "strategy": "cpu fp32", "tokens": tokens, "kind": "quick"}],
                             v7=version == "v7")[0]["seq"]
    default = rwkv_convert.load(path).forward(tokens, full_output=True)[0]
    package = rwkv_convert.load(path, ln0_fold="package").forward(tokens, full_output=True)[0]
    assert (package - pip).abs().max().item() <= FP32_BOUND
    if version == "v7":
        assert torch.equal(default, package)
    else:
        assert (default - pip).abs().max().item() > 10 * (package - pip).abs().max().item()
    with pytest.raises(RwkvConvertError, match="unknown ln0 fold"):
        rwkv_convert.load(path, ln0_fold="bf16")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sequence_mode_equals_token_by_token(variant, fixture_dir):
    model = rwkv_convert.load(fixture_path(variant, "fp32", directory=fixture_dir))
    tokens = list(range(5, 45))
    ours = run_three_ways(model, tokens)
    # Batched and one-row matmuls take different BLAS kernels: fp32 rounding only (measured <= 3e-5).
    assert max_diff(ours["seq"], ours["one"]) <= FP32_BOUND
    assert max_diff(ours["seq"], ours["split"]) <= FP32_BOUND


def test_sequence_mode_batches_projections(fixture_dir, monkeypatch):
    """Matmuls are issued a fixed number of times per layer whatever T is: only the recurrence walks tokens."""
    model = rwkv_convert.load(fixture_path("v6", "fp32", directory=fixture_dir))
    calls = []
    linear, bmm = torch.nn.functional.linear, torch.bmm
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or bmm(*a, **k))
    counts = []
    for n in (16, 64):
        calls.clear()
        model.forward(list(range(1, n + 1)))
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0


def test_forward_does_not_modify_the_given_state(fixture_dir):
    model = rwkv_convert.load(fixture_path("v7", "fp32", directory=fixture_dir))
    _, state = model.forward([1, 2, 3])
    before = [t.clone() for t in state]
    model.forward([4, 5], state)
    model.forward([6], state)
    assert max_diff(state, before) == 0.0


def test_full_output_shapes(fixture_dir):
    model = rwkv_convert.load(fixture_path("v5.2", "fp32", directory=fixture_dir))
    assert model.forward([1, 2, 3])[0].shape == (512,)
    assert model.forward([1, 2, 3], full_output=True)[0].shape == (3, 512)
    assert model.forward([1], full_output=True)[0].shape == (1, 512)
    assert model.forward(7)[0].dtype == torch.float32


def test_state_layout_matches_pip(fixture_dir):
    v4 = rwkv_convert.load(fixture_path("v4", "fp32", directory=fixture_dir))
    state = v4.init_state()
    assert len(state) == 5 * 7 and torch.equal(state[3], torch.full((128,), -1e30))
    v7 = rwkv_convert.load(fixture_path("v7", "fp32", directory=fixture_dir))
    assert [tuple(t.shape) for t in v7.init_state()[:3]] == [(128,), (2, 64, 64), (128,)]


def test_time_state_initialises_the_kv_state(fixture_dir):
    ckpt = rwkv_convert.read_checkpoint(fixture_path("v5.2-state", "fp32", directory=fixture_dir))
    model = rwkv_convert.Model(ckpt)
    stored = ckpt.tensors["blocks.3.att.time_state"]  # [h, value, key]
    assert torch.equal(model.init_state()[3 * 3 + 1], stored.transpose(1, 2))


def test_bad_tokens_and_states_are_clear_errors(fixture_dir):
    model = rwkv_convert.load(fixture_path("v6", "fp32", directory=fixture_dir))
    with pytest.raises(rwkv_convert.RwkvConvertError, match="token id 512 is outside the vocabulary"):
        model.forward([1, 512])
    with pytest.raises(rwkv_convert.RwkvConvertError, match="token id -1"):
        model.forward([-1])
    with pytest.raises(rwkv_convert.RwkvConvertError, match="non-empty"):
        model.forward([])
    state = model.init_state()
    with pytest.raises(rwkv_convert.RwkvConvertError, match="state has 20 tensors.*needs 21"):
        model.forward([1], state[:-1])
    state[4] = torch.zeros(3)
    with pytest.raises(rwkv_convert.RwkvConvertError, match=r"state\[4\] \(att_kv of layer 1\)"):
        model.forward([1], state)


def test_a_state_from_another_precision_is_accepted(fixture_dir):
    path = fixture_path("v5.2", "fp32", directory=fixture_dir)
    _, fp32_state = rwkv_convert.load(path).forward([1, 2, 3])
    bf16 = rwkv_convert.load(path, "cpu bf16")
    logits, state = bf16.forward([4], fp32_state)
    assert torch.isfinite(logits).all() and state[0].dtype == torch.bfloat16 and state[1].dtype == torch.float32


def test_bf16_and_fp16_strategies_run_close_to_fp32(fixture_dir):
    path = fixture_path("v6", "fp32", directory=fixture_dir)
    tokens = list(range(10, 40))
    ref = rwkv_convert.load(path).forward(tokens, full_output=True)[0]
    for strategy, bound in (("cpu bf16", 1.0), ("cpu fp16", 0.1)):
        model = rwkv_convert.load(path, strategy)
        out = model.forward(tokens, full_output=True)[0]
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert max_diff(out, ref) <= bound, (strategy, max_diff(out, ref))
    assert rwkv_convert.load(path, "cpu fp16").rescale_layer == 6
    assert rwkv_convert.load(fixture_path("v7", "fp32", directory=fixture_dir), "cpu fp16").rescale_layer == 0


@pytest.mark.parametrize("variant", ["v4", "v5.2", "v6", "v7"])
def test_mixed_chains_place_each_layer_and_stay_close(variant, fixture_dir):
    path = fixture_path(variant, "fp32", directory=fixture_dir)
    tokens = list(range(1, 30))
    ref = rwkv_convert.load(path).forward(tokens, full_output=True)[0]
    model = rwkv_convert.load(path, "cpu fp32 *3 -> cpu bf16")
    assert [p.atype for p in model.placements] == [torch.float32] * 3 + [torch.bfloat16] * 5
    out, state = model.forward(tokens, full_output=True)
    assert state[0].dtype == torch.float32 and state[-1].dtype == torch.bfloat16
    assert max_diff(out, ref) <= 1.0  # bf16 activations in 4 of 7 layers (measured 0.09-0.37)
    assert torch.isfinite(model.forward([3], state)[0]).all()


def test_v52_bonus_stored_as_log_time_first_gives_the_same_model(tmp_path, fixture_dir):
    """Some v5.2 files store the bonus as `time_first` = log(u) instead of `time_faaaa` = u."""
    from .conftest import save_atomic

    path = fixture_path("v5.2", "fp32", directory=fixture_dir)
    # u must be positive to have a log; real files' bonuses are.
    sd = {k: (v.clamp_min(1e-3) if "time_faaaa" in k else v) for k, v in torch.load(path, weights_only=True).items()}
    log_form = {k.replace("time_faaaa", "time_first"): (torch.log(v) if "time_faaaa" in k else v)
                for k, v in sd.items()}
    ref_path = save_atomic(sd, tmp_path / "faaaa.pth")
    log_path = save_atomic(log_form, tmp_path / "log.pth")
    assert rwkv_convert.read_checkpoint(log_path).spec.bonus_is_log
    tokens = list(range(3, 40))
    expected = rwkv_convert.load(ref_path).forward(tokens, full_output=True)[0]
    assert max_diff(rwkv_convert.load(log_path).forward(tokens, full_output=True)[0], expected) <= 1e-4


def test_verify_folds_ln0_as_a_pip_file_holds_it(tmp_path):
    """A pip-converted file of an fp16 checkpoint holds the package's fp16 fold: verify's reference folds the
    same way for it by default (with the fp32 fold it differs by that rounding alone, beyond fp32's bound)."""
    from .test_cli import cli

    sd = {k: v.half() for k, v in make_state_dict("v6", n_layer=3, n_embd=128, vocab=512).items()}
    src = save_atomic(sd, tmp_path / "v6-fp16.pth")
    out = tmp_path / "pip.pth"
    assert cli("convert", src, "--to", "pip", "--strategy", "cpu fp32", "-o", out).returncode == 0
    proc = cli("verify", out, "--reference", src, "--tokens", "16")
    assert proc.returncode == 0 and "ln0 folded as the pip package folds it" in proc.stdout, proc.stdout
    assert cli("verify", out, "--reference", src, "--tokens", "16", "--ln0-fold", "package").returncode == 0
