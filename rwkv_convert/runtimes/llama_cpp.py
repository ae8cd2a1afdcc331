"""Running a GGUF in llama.cpp through llama-cpp-python: per-token logits, the state carried by feeding
the tokens in chunks, `reset()` between streams."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from ..client_files import client_view
from ..errors import RwkvConvertError, brief
from .base import Client

LLAMA_PIN = "llama-cpp-python==0.3.36"  # the release our GGUF tests run
CLIENT = Client("llama.cpp (llama-cpp-python)", "llama-cpp-python", "llama_cpp",
                "runs GGUF files in llama.cpp (verify, quality)",
                f"pip install {LLAMA_PIN}  (builds llama.cpp: 5-10 minutes)")


def _llama_class():
    return CLIENT.imported("running GGUF files in llama.cpp", "or verify with --runner ours").Llama


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints its load log on fd 2 even with verbose=False in some paths."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _without_extra_buffer_types():
    """Models loaded inside get use_extra_bufts = False: on CPUs with AMX, llama.cpp's extra (repacking) buffer
    types crash quantized RWKV models on multi-token batches (segfault, Q8_0 and Q4_0 at least). Llama() has no
    argument for it (0.3.36 swallows unknown keywords), so its default model parameters are amended while it
    loads."""
    import llama_cpp.llama as llama_module

    bindings = llama_module.llama_cpp
    default = bindings.llama_model_default_params

    def amended():
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = amended
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


class LlamaCppSession:
    """A GGUF opened in llama.cpp: a runtimes.base.Session."""

    def __init__(self, path, n_ctx: int = 512, logits_all: bool = True):
        """logits_all=False keeps only the last token's logits (what a benchmark of prefill wants)."""
        Llama = _llama_class()
        # llama.cpp gets the checked file alone, under our name: no split siblings found by its name (client_files)
        with client_view({"model.gguf": Path(path)}) as view, _quiet_stderr(), _without_extra_buffer_types():
            try:
                # Never n_ctx=0 (the file says 1M tokens of context)
                self.llm = Llama(str(view.path("model.gguf")), n_ctx=n_ctx, logits_all=logits_all, verbose=False)
            except Exception as e:  # llama-cpp-python raises ValueError on a failed load
                raise RwkvConvertError(f"llama.cpp could not load {path}: {brief(e)}") from None

    def logits(self, chunks: list[list[int]]) -> torch.Tensor:
        """[T, V] logits of every token, fed chunk by chunk (the state carried), from a fresh state."""
        self.llm.reset()
        for chunk in chunks:
            self.llm.eval(chunk)
        return torch.from_numpy(np.array(self.llm.scores[: self.llm.n_tokens], dtype=np.float32))

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")
