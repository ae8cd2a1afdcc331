"""Text generation: sampling from logits and a streaming generate loop."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import RwkvConvertError
from .tokenizer import END_OF_TEXT, StreamDecoder


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.85,
           generator: torch.Generator | None = None) -> int:
    """Nucleus sampling as the pip package does it; temperature 0 is greedy (argmax)."""
    if temperature < 0 or not 0 <= top_p <= 1:
        raise RwkvConvertError("temperature must be >= 0 and top-p within [0, 1]")
    if not torch.isfinite(logits).all():
        raise RwkvConvertError("the model produced NaN or infinite logits (an overflow: try a wider dtype, e.g."
                               ' --strategy "cpu fp32", or check the checkpoint)')
    if temperature == 0 or top_p == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, _ = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    cutoff = sorted_probs[int(torch.searchsorted(cumulative, torch.tensor(top_p)).clamp(max=len(probs) - 1))]
    probs = torch.where(probs < cutoff, torch.zeros_like(probs), probs)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def generate(model, tokenizer, prompt: str, max_tokens: int, temperature: float = 1.0, top_p: float = 0.85,
             seed: int | None = None, stop_at_end: bool = True) -> Iterator[str]:
    """Yields text pieces as tokens are produced (prompt is prefilled in one sequence call)."""
    prompt_tokens = tokenizer.encode(prompt)
    if not prompt_tokens:
        raise RwkvConvertError("the prompt is empty; give some text with --prompt" if not prompt else
                               f"the tokenizer turns the prompt {prompt[:40]!r} into no tokens; check --tokenizer")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = model.forward(prompt_tokens)
    decoder = StreamDecoder(tokenizer)
    for _ in range(max_tokens):
        token = sample(logits, temperature, top_p, generator)
        if token == END_OF_TEXT and stop_at_end:
            break
        piece = decoder.feed(token)
        if piece:
            yield piece
        logits, state = model.forward([token], state)
    tail = decoder.flush()
    if tail:
        yield tail

