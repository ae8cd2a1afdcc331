"""Our own Q3_K and Q2_K blocks: bit for bit what llama.cpp reads (gguf-py's dequantizer gives back exactly the
values our grid chose), llama-quantize's Q3_K_* / Q2_K mixes written by us load and run in llama.cpp, and
calibration lowers their KL there (on the bundled trained RWKV-7)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

import rwkv_convert
from rwkv_convert.bundled import trained_model
from rwkv_convert.quant import gguf_blocks

LLAMA = importlib.util.find_spec("llama_cpp") is not None or os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA") == "1"


@pytest.mark.parametrize("qtype", ["q3_k", "q2_k"])
def test_blocks_are_what_llama_cpp_reads(qtype):
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((12, 768)).astype(np.float32) * np.geomspace(0.01, 5, 768, dtype=np.float32)
    rows[3] = 0  # a row of zeros: scales of zero
    rows[4, :256] = 1.5  # a constant super-block
    rows[5, 10] = 400  # an outlier
    importance = rng.random(768).astype(np.float32)
    codec = gguf_blocks.CODECS[qtype]
    for weights in (None, importance):
        packed = gguf_blocks.quantize_any(rows, qtype, weights)
        assert packed.shape == (12, 3 * {"q3_k": 110, "q2_k": 84}[qtype])
        n, blocks, w = gguf_blocks.as_blocks(rows, weights, codec.size, "super-blocks")
        grid = codec.grid(codec.fit(blocks, w))
        chosen = grid.values(grid.levels(blocks)).reshape(rows.shape)
        back = quants.dequantize(packed, getattr(GGMLQuantizationType, qtype.upper()))
        assert np.array_equal(back, chosen.astype(np.float32))
        assert not back[3].any()
        error = np.linalg.norm(back - rows) / np.linalg.norm(rows)
        assert error < {"q3_k": 0.2, "q2_k": 0.4}[qtype], error


def test_more_bits_less_error():
    rows = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    errors = [np.linalg.norm(quants.dequantize(gguf_blocks.quantize_any(rows, q), getattr(GGMLQuantizationType,
                                                                                          q.upper())) - rows)
              for q in ("q4_k", "q3_k", "q2_k")]
    assert errors == sorted(errors), errors


@pytest.mark.skipif(not LLAMA, reason="needs llama-cpp-python")
@pytest.mark.parametrize("mix", ["q3_k_m", "q2_k"])
def test_calibrated_low_bit_mixes_beat_plain_in_llama_cpp(mix, tmp_path):
    from rwkv_convert.quality import file_figures

    source = trained_model("v7")
    plain = rwkv_convert.convert(source, "gguf", tmp_path / "plain.gguf", quant=mix)[0]
    calibrated = rwkv_convert.convert(source, "gguf", tmp_path / "cal.gguf", quant=mix, calibration="bundled")[0]
    assert plain.stat().st_size == calibrated.stat().st_size
    kl_plain = file_figures(source, plain, max_bytes=4096)["kl"]
    kl_cal = file_figures(source, calibrated, max_bytes=4096)["kl"]
    assert kl_cal < 0.85 * kl_plain, (kl_cal, kl_plain)
