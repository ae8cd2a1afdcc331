"""Our importance-weighted GGUF block quantizer: blocks gguf-py (llama.cpp's layout) reads back, with less
weighted error than the plain rule, on any row width; and the calibration statistics it is fed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rwkv_convert
from rwkv_convert.calibration import activation_importance
from rwkv_convert.quant.gguf_blocks import TYPES, quantize

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
