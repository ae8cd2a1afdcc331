"""Each client's own tokenizer fits the model it ships with: text encoded by it gives the ids our tokenizer gives
(never an id the model lacks), and generation through the client runs. Byte-level models (the bundled ones,
V=257) and World-vocabulary ones (V=65536); transformers' AutoTokenizer for HF directories, llama.cpp's for
GGUF files."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import rwkv_convert
from rwkv_convert.bundled import trained_model
from rwkv_convert.fixtures import make_state_dict
from rwkv_convert.tokenizer import default_tokenizer

from .conftest import save_atomic

PROMPT = "def main():\n    return 'héllo, 世界'\n"


@pytest.fixture(scope="module", params=["bytes", "world"])
def source(request, tmp_path_factory):
    """(checkpoint, vocabulary size)."""
    if request.param == "bytes":
        return trained_model("v7"), 257
    folder = tmp_path_factory.mktemp("world")
    return save_atomic(make_state_dict("v7", n_layer=1, n_embd=64, vocab=65536), folder / "world.pth"), 65536


def test_the_hf_tokenizer_fits_the_model_and_generates(source, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, vocab = source
    directory = rwkv_convert.convert(src, "safetensors", tmp_path / "hf", layout="hf")[0].parent
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.max().item() < vocab
    assert ids[0].tolist() == default_tokenizer(vocab).encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True, dtype=torch.float32)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert tokenizer.decode(out[0][: ids.shape[1]]) == PROMPT


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None and os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA")
                    != "1", reason="needs llama-cpp-python")
def test_the_gguf_tokenizer_fits_the_model_and_generates(source, tmp_path):
    from llama_cpp import Llama

    src, vocab = source
    path = rwkv_convert.convert(src, "gguf", tmp_path / "m.gguf", quant="f16")[0]
    llm = Llama(str(path), n_ctx=128, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    assert max(ids) < vocab
    assert ids == default_tokenizer(vocab).encode(PROMPT)
    out = llm(PROMPT, max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_a_vocabulary_no_shipped_tokenizer_fits_is_refused_without_one(tmp_path):
    src = save_atomic(make_state_dict("v7", n_layer=1, n_embd=64, vocab=200), tmp_path / "v200.pth")
    with pytest.raises(rwkv_convert.RwkvConvertError, match="give its tokenizer"):
        rwkv_convert.convert(src, "safetensors", tmp_path / "hf", layout="hf")
    assert not (tmp_path / "hf").exists()
