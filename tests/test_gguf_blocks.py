"""Our importance-weighted GGUF block quantizer: blocks gguf-py (llama.cpp's layout) reads back, with less
weighted error than the plain rule, on any row width; and the calibration statistics it is fed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rwkv_convert
from rwkv_convert.calibration import activation_importance
from rwkv_convert.quant.gguf_blocks import CODECS, TYPES, quantize, quantize_any

gguf = pytest.importorskip("gguf")


def rows_with_outliers(n=48, k=320, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, rng.choice(k, 4, replace=False)] *= 40  # per-channel outliers, as trained RWKV weights have
    importance = rng.gamma(0.5, 2.0, k).astype(np.float32)  # activations: a few channels dominate
    return x, importance


@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_read_back_with_less_weighted_error_than_the_plain_rule(qtype):
    x, importance = rows_with_outliers()
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    plain = gguf.quants.quantize(x, gtype)
    for weights in (None, importance):
        ours = quantize(x, qtype, weights)
        assert ours.shape == plain.shape and ours.dtype == np.uint8
        back = gguf.quants.dequantize(ours, gtype)
        w = np.ones(x.shape[1]) if weights is None else weights
        err = lambda d, w=w: float(((d - x) ** 2 * w).sum())  # noqa: E731
        assert np.isfinite(back).all()
        assert err(back) < err(gguf.quants.dequantize(plain, gtype)), qtype
    # the importance is what decides: the weighted search beats the unweighted one on the weighted error
    unweighted = gguf.quants.dequantize(quantize(x, qtype), gtype)
    weighted = gguf.quants.dequantize(quantize(x, qtype, importance), gtype)
    assert (((weighted - x) ** 2) * importance).sum() <= (((unweighted - x) ** 2) * importance).sum()


def test_zero_blocks_and_bad_shapes():
    for qtype in TYPES:
        gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
        zeros = np.zeros((2, 64), np.float32)
        assert np.array_equal(gguf.quants.dequantize(quantize(zeros, qtype), gtype), zeros)
    with pytest.raises(ValueError, match="whole blocks"):
        quantize(np.zeros((2, 40), np.float32), "q4_0")
    with pytest.raises(ValueError, match="importance"):
        quantize(np.zeros((2, 64), np.float32), "q4_0", np.ones(32))


def test_calibration_measures_every_matrix_input(tmp_path):
    from rwkv_convert.fixtures import make_state_dict

    from .conftest import save_atomic
    sd = make_state_dict("v6", n_layer=2, n_embd=96, vocab=300, head_size=32)
    ckpt = rwkv_convert.read_checkpoint(save_atomic(sd, tmp_path / "v6.pth"))
    text = tmp_path / "text.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 20)
    stats = activation_importance(ckpt, text)
    matrices = [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2 and k.startswith("blocks.")]
    assert set(stats) == set(matrices) | {"head.weight"}
    for key, v in stats.items():
        assert v.shape == (sd[key].shape[1],) and torch.isfinite(v).all() and (v >= 0).all() and v.sum() > 0


def test_the_size_planner_fits_the_budget_by_the_cheapest_error_per_byte():
    from rwkv_convert.errors import RwkvConvertError
    from rwkv_convert.quant.size_plan import Option, parse_target, plan

    def ladder(scale):  # bytes falling, error rising; a dominated option (more bytes, more error) included
        return [Option("q8_0", 100, 1 * scale), Option("q6_k", 80, 3 * scale), Option("q5_1", 85, 9 * scale),
                Option("q4_0", 55, 20 * scale)]
    candidates = {"sensitive": ladder(10.0), "robust": ladder(0.1)}
    assert {n: o.qtype for n, o in plan(candidates, 10, 1000).items()} == {"sensitive": "q8_0", "robust": "q8_0"}
    chosen = plan(candidates, 10, 150)  # 210 at q8_0: the robust tensor steps down first, all the way
    assert chosen["robust"].qtype == "q4_0" and chosen["sensitive"].qtype == "q6_k"
    assert 10 + sum(o.nbytes for o in chosen.values()) <= 150
    assert all(o.qtype != "q5_1" for o in plan(candidates, 10, 125).values())  # dominated: never chosen
    with pytest.raises(RwkvConvertError, match="below the smallest"):
        plan(candidates, 10, 100)
    assert parse_target("60%", 1000) == 600 and parse_target("3.5MB", 0) == 3_500_000
    assert parse_target("2KiB", 0) == 2048 and parse_target("1200", 0) == 1200
    for bad in ("0%", "150%", "big", "-3MB"):
        with pytest.raises(RwkvConvertError, match="target-size"):
            parse_target(bad, 1000)


def correlated_inputs(k, seed=1, n=4096):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.1 + np.eye(k)
    x = rng.standard_normal((n, k)) @ mix
    x[:, rng.choice(k, 6, replace=False)] *= 12  # a few channels carry most of the activation energy
    return x.T @ x / n


@pytest.mark.parametrize("qtype", list(CODECS))
def test_gptq_blocks_read_back_exactly_and_cut_the_output_error(qtype):
    from rwkv_convert.quant.gptq import quantize_gptq
    k = 320 if CODECS[qtype].size == 32 else 512  # rows not a multiple of the lazy batch
    x, _ = rows_with_outliers(n=40, k=k, seed=3)
    hessian = correlated_inputs(k)
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    packed, values = quantize_gptq(x, hessian, qtype)
    back = gguf.quants.dequantize(packed, gtype)
    assert packed.shape == quantize_any(x, qtype).shape and np.array_equal(back, values)

    def output_error(q):  # sum over rows of (w - q) H (w - q)^T: the error on the matrix's outputs
        d = (x - q).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", d, hessian, d))
    rounded = gguf.quants.dequantize(quantize_any(x, qtype, np.diag(hessian).astype(np.float32)), gtype)
    assert output_error(back) < 0.7 * output_error(rounded), qtype
    with pytest.raises(ValueError, match="GPTQ needs"):
        quantize_gptq(x, hessian[:-32, :-32], qtype)


def test_layerwise_gptq_quantizes_every_matrix_of_a_model_of_other_shapes(tmp_path):
    from rwkv_convert.calibration import LayerwiseGptq
    from rwkv_convert.fixtures import make_state_dict

    from .conftest import save_atomic
    sd = make_state_dict("v7", n_layer=3, n_embd=192, vocab=320, head_size=64)
    ckpt = rwkv_convert.read_checkpoint(save_atomic(sd, tmp_path / "v7.pth"))
    text = tmp_path / "text.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 40)
    keys = [k for k in sd if k.startswith("blocks.") and k.endswith(".weight") and sd[k].ndim == 2
            and sd[k].shape[1] % 32 == 0] + ["head.weight"]
    gptq = LayerwiseGptq(ckpt, text, {k: "q4_0" for k in keys}, window=128)
    for key in ["head.weight"] + sorted(set(keys) - {"head.weight"}, key=lambda k: int(k.split(".")[1])):
        blocks = gptq.blocks(key)
        back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
        assert back.shape == tuple(sd[key].shape) and np.isfinite(back).all()
        assert np.abs(back - sd[key].float().numpy()).max() < np.abs(sd[key].float().numpy()).max()
    with pytest.raises(ValueError, match="after its layer"):
        gptq.blocks(keys[0])
