"""Running a Hugging Face export the way its users load it: AutoModelForCausalLM (RWKV-4: transformers' own
RwkvForCausalLM; RWKV-7: the rwkv7-hf code shipped in the directory, trust_remote_code), on the CPU in fp32,
the state carried through the model's cache between calls."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import RwkvConvertError, brief

# model_type in config.json -> how the model hands its state back and takes it again
CARRIED = {"rwkv": ("state", "state"), "rwkv7": ("past_key_values", "past_key_values")}
STORED = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def model_type(directory: Path) -> str | None:
    try:
        return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def runs_in_transformers(directory: Path) -> bool:
    """RWKV-4 and RWKV-7 directories have a transformers client; v5.2/v6 ones are for llama.cpp's converter."""
    return model_type(directory) in CARRIED


def stored_scheme(directory: Path) -> str:
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    return STORED.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), "fp32")


class TransformersRunner:
    def __init__(self, directory: Path):
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging
        except ImportError:
            raise RwkvConvertError("running HF exports needs transformers (and, for RWKV-7, rwkv7-hf's dependencies):"
                                   " pip install 'rwkv-convert[runtimes]' (or verify with --runner ours)") from None
        self.kind = model_type(directory)
        logging.set_verbosity_error()  # its load bars and deprecation notes would bury verify's own lines
        logging.disable_progress_bar()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=self.kind == "rwkv7",
                                                              dtype=torch.float32).eval()
        except Exception as e:  # transformers raises many kinds on a bad directory or missing remote code
            raise RwkvConvertError(f"transformers could not load {directory}: {brief(e)}") from None

    def logits(self, chunks: list[list[int]]) -> torch.Tensor:
        """[T, V] fp32 logits of every token, fed chunk by chunk with the state carried, from a fresh state."""
        given, returned = CARRIED[self.kind]
        carried, rows = None, []
        with torch.no_grad():
            for chunk in chunks:
                kwargs = {given: carried} if carried is not None else {}
                out = self.model(torch.tensor([chunk]), use_cache=True, **kwargs)
                carried = getattr(out, returned)
                rows.append(out.logits[0].float())
        return torch.cat(rows)

    def run(self, tokens: list[int], split: int) -> dict:
        return {"seq": self.logits([tokens]), "one": self.logits([[t] for t in tokens]),
                "split": self.logits([tokens[:split], tokens[split:]])}
