"""Our own runner (runner.Model, and onnxruntime through OnnxModel, which runs with the runner's interface) as a
runtime `Session`, plus the final states verify also compares where both sides have them."""

from __future__ import annotations

import torch


class ForwardSession:
    """A session over anything with the runner's `forward(tokens, state, full_output)`."""

    def __init__(self, model):
        self.model = model

    def logits(self, chunks: list[list[int]]) -> torch.Tensor:
        return self.logits_and_state(chunks)[0]

    def logits_and_state(self, chunks: list[list[int]]) -> tuple[torch.Tensor, list]:
        state, rows = None, []
        for chunk in chunks:
            # one token asks for the last logits: the call a client's decoding loop makes (ONNX: the step graph)
            logits, state = self.model.forward(chunk, state, full_output=len(chunk) > 1)
            rows.append(logits if logits.dim() == 2 else logits.unsqueeze(0))
        return torch.cat(rows), state


def run_ours(model, tokens: list[int], split: int) -> dict:
    """verify's three modes (runtimes.base.verify_modes) with each mode's final state ("seq_state", ...)."""
    session, outputs = ForwardSession(model), {}
    for mode, chunks in (("seq", [tokens]), ("one", [[t] for t in tokens]),
                         ("split", [tokens[:split], tokens[split:]])):
        outputs[mode], outputs[mode + "_state"] = session.logits_and_state(chunks)
    return outputs
