"""llama-quantize's mix names (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q3_K_*, Q2_K, all written by our quantizer) give the
per-tensor types and the size llama-quantize itself gives an RWKV file, load and verify in llama.cpp; and a file
llama-quantize rewrote from ours (it copies our CRC-32 keys) reads as another tool's file, not as a damaged one of
ours."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest

import rwkv_convert
from rwkv_convert.bundled import trained_model
from rwkv_convert.verify import verify

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None
                                and os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA") != "1",
                                reason="needs llama-cpp-python")


def types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("mix", ["Q4_K_M", "q5_k_s", "Q3_K_M", "q2_k"])
def test_mixes_match_llama_quantize_and_verify(mix, tmp_path):
    import llama_cpp

    source = trained_model("v7")
    ours = rwkv_convert.convert(source, "gguf", tmp_path / "ours.gguf", quant=mix)[0]
    f16 = rwkv_convert.convert(source, "gguf", tmp_path / "f16.gguf", quant="f16")[0]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + mix.upper())
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), params) == 0
    assert types(ours) == types(theirs)
    assert types(ours)["output.weight"] == "Q6_K"
    assert ours.stat().st_size == theirs.stat().st_size
    for path in (ours, theirs):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            report = verify(path, source, tokens=16)
        assert report.passed, (path.name, report.worst)
        rewritten = [w for w in seen if "rewritten by another tool" in str(w.message)]
        assert bool(rewritten) == (path == theirs)
