"""Our own Q3_K and Q2_K blocks: bit for bit what llama.cpp reads (gguf-py's dequantizer gives back exactly the
values our grid chose), llama-quantize's Q3_K_* / Q2_K mixes written by us load and run in llama.cpp, and
calibration lowers their KL there (on the bundled trained RWKV-7)."""

from __future__ import annotations

import importlib.util
import os
import re

import gguf
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


FACTOR = re.compile(r"^blk\.\d+\.time_mix_(w|a|v|g|decay_w)[12]\.weight$")  # the LoRA factors' names


def gguf_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.skipif(not LLAMA, reason="needs llama-cpp-python")
def test_target_size_plans_the_lora_factors_llama_quantize_keeps_f32(tmp_path):
    """At the bytes of a Q4_K_M file, --target-size spends what llama-quantize leaves in F32 LoRA factors (42% of
    this small model's file) on the large matrices: measured KL 8.8e-5 against 2.2e-3 with the factors kept F32
    (--small-matrices f32, llama-quantize's choice) and 2.1e-3 for our calibrated Q4_K_M."""
    from rwkv_convert.quality import file_figures

    source = trained_model("v7")
    mix = rwkv_convert.convert(source, "gguf", tmp_path / "mix.gguf", quant="q4_k_m")[0]
    budget = mix.stat().st_size
    with pytest.warns(rwkv_convert.errors.CastWarning, match="planned"):
        planned = rwkv_convert.convert(source, "gguf", tmp_path / "planned.gguf", target_size=str(budget))[0]
        kept = rwkv_convert.convert(source, "gguf", tmp_path / "kept.gguf", target_size=str(budget),
                                    small_matrices="f32")[0]
    factors = [n for n in gguf_types(mix) if FACTOR.match(n)]
    assert factors and all(gguf_types(mix)[n] == "F32" for n in factors)
    assert all(gguf_types(kept)[n] == "F32" for n in factors)
    assert sum(gguf_types(planned)[n] != "F32" for n in factors) > len(factors) // 2
    assert planned.stat().st_size <= budget and kept.stat().st_size <= budget
    kl_planned, kl_kept = (file_figures(source, p, max_bytes=4096)["kl"] for p in (planned, kept))
    assert kl_planned < 0.25 * kl_kept, (kl_planned, kl_kept)


@pytest.mark.skipif(not LLAMA, reason="needs llama-cpp-python")
@pytest.mark.parametrize("variant,ranks", [("v7", {"w": 48, "a": 32, "v": 16, "g": 64}),
                                           ("v6", {"maa": 32, "decay": 48}), ("v5.2", None)])
def test_planned_lora_factors_of_any_rank_verify_in_llama_cpp(variant, ranks, tmp_path):
    """Ranks whose rows no block divides stay F32/F16; v5.2's zero LoRAs (written for llama.cpp's rwkv6) cost
    nothing at any type; the file verifies in llama.cpp against the source."""
    from rwkv_convert.verify import verify

    from .conftest import save_atomic

    sd = rwkv_convert.fixtures.make_state_dict(variant, n_layer=2, n_embd=192, vocab=300, ranks=ranks)
    source = save_atomic(sd, tmp_path / f"{variant}.pth")
    with pytest.warns(rwkv_convert.errors.CastWarning, match="planned"):
        out = rwkv_convert.convert(source, "gguf", tmp_path / "m.gguf", target_size="40%")[0]
    types = gguf_types(out)
    lora = {n: t for n, t in types.items() if FACTOR.match(n)}
    assert lora and any(t not in ("F32", "F16") for t in lora.values()), lora
    shapes = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(out).tensors}
    for name, qtype in lora.items():  # rows of 48 or 16 values: no block type divides them
        rows = shapes[name]
        assert qtype in ("F32", "F16") or rows % 32 == 0, (name, qtype, rows)
    report = verify(out, source, tokens=16)
    assert report.passed, report.worst


def test_small_matrices_without_a_target_size_is_refused(tmp_path):
    from .test_cli import assert_one_line_error, cli

    proc = cli("convert", str(trained_model("v7")), "--to", "gguf", "--small-matrices", "f32", "-o",
               tmp_path / "m.gguf")
    assert_one_line_error(proc, "--small-matrices chooses what --target-size plans")
    assert not (tmp_path / "m.gguf").exists()
