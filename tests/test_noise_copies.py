"""A verification that cannot fail is no verification: for every weight scheme `verify` judges, a copy of the
model whose matrices are pure noise (same shapes, same spread), converted the same way, must FAIL against the
real model, and the honest conversion must PASS - at 4-5 bits too, where the table alone once allowed anything."""

from __future__ import annotations

import pytest
import torch

import rwkv_convert
from rwkv_convert.fixtures import make_state_dict
from rwkv_convert.verify import verify

from .conftest import save_atomic


def needs_llama() -> None:
    """GGUF files are run in llama.cpp: skipped without llama-cpp-python, except in CI (where it must be there)."""
    import importlib.util
    import os

    if importlib.util.find_spec("llama_cpp") is None and os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA") != "1":
        pytest.skip("needs llama-cpp-python")

# scheme -> (convert target, options); each file's least precise weights are that scheme
SCHEMES = {
    "fp32": ("safetensors", {"layout": "prepared", "strategy": "cpu fp32"}),
    "fp16": ("safetensors", {"layout": "prepared", "strategy": "cpu fp16"}),
    "bf16": ("safetensors", {"layout": "prepared", "strategy": "cpu bf16"}),
    "i8": ("safetensors", {"layout": "prepared", "strategy": "cpu fp32i8"}),
    "bf16i8": ("safetensors", {"layout": "prepared", "strategy": "cpu bf16i8"}),
    "q8_0": ("gguf", {"quant": "q8_0"}),
    "int8-block": ("onnx", {"quant": "int8"}),
    "int4-block": ("onnx", {"quant": "int4"}),
    "q5/q4 (q4_0)": ("gguf", {"quant": "q4_0"}),
    "q5/q4 (q4_k)": ("gguf", {"quant": "q4_k"}),
    "q5/q4 (q5_k)": ("gguf", {"quant": "q5_k"}),
    "q3/q2 (q3_k_m)": ("gguf", {"quant": "q3_k_m"}),
    "q3/q2 (q2_k)": ("gguf", {"quant": "q2_k"}),
}
SUFFIX = {"safetensors": ".safetensors", "gguf": ".gguf", "onnx": ".onnx"}
# 2 bits of a random model are as far from it as noise is (measured on the 2-layer C256 one: llama.cpp's own Q2_K
# and ours each pass or fail by the stream's length, KL ~1 either way): Q2_K is judged on the bundled trained v7
TRAINED = {"q3/q2 (q2_k)"}


def noise_copy(sd: dict) -> dict:
    """Every matrix replaced by Gaussian noise of its own spread (what a broken download or a mixed-up file
    looks like to a reader: right names, right shapes, nothing learned)."""
    g = torch.Generator().manual_seed(7)
    return {k: (torch.randn(v.shape, generator=g) * v.float().std()).to(v.dtype) if v.ndim == 2 and v.numel() > 4096
            else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    real = make_state_dict("v7", n_layer=2, n_embd=256, vocab=512)  # 256: whole K-quant super-blocks
    return save_atomic(real, folder / "real.pth"), save_atomic(noise_copy(real), folder / "noise.pth"), folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from rwkv_convert.bundled import trained_model

    folder = tmp_path_factory.mktemp("noise-trained")
    real = trained_model("v7")
    return real, save_atomic(noise_copy(torch.load(real, weights_only=True)), folder / "noise.pth"), folder


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_a_noise_copy_fails_and_the_honest_file_passes(scheme, request):
    to, options = SCHEMES[scheme]
    if to == "gguf":
        needs_llama()
    real, noise, folder = request.getfixturevalue("trained" if scheme in TRAINED else "models")
    name = scheme.replace("/", "-").replace(" ", "").replace("(", "-").replace(")", "")
    honest = rwkv_convert.convert(real, to, folder / f"honest-{name}{SUFFIX[to]}", **options)[0]
    garbage = rwkv_convert.convert(noise, to, folder / f"noise-{name}{SUFFIX[to]}", **options)[0]
    good = verify(honest, real, tokens=24)
    assert good.passed, (scheme, good.worst, good.rows)
    assert good.scheme == scheme.split(" ")[0]
    bad = verify(garbage, real, tokens=24)
    assert not bad.passed, (scheme, bad.worst, bad.rows)
    assert bad.scheme == good.scheme
    # judged on every position: the noise copy is caught even where no position is "confident"
    assert "noise baseline" in bad.worst or "KL" in bad.worst or "relative L2" in bad.worst
