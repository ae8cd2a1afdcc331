"""Text generation: sampling from logits and a streaming generate loop."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .bundled import DEFAULT_PROMPT, trained_model
from .errors import RwkvConvertError
from .formats import registry
from .tokenizer import END_OF_TEXT, HFTokenizer, StreamDecoder, check_fits, default_tokenizer

NEOX_VOCABS = (50277, 50304)
CHAT_PROMPT = "\nUser: Hello!\n\nAssistant:"  # RWKV-4 Pile/Raven models (GPT-NeoX 20B tokenizer)


@dataclass
class RunSetup:
    """What `rwkv-convert run` generates from: the model, its tokenizer, the prompt, and notes for the user."""
    model: object
    tokenizer: object
    prompt: str
    notes: list[str]


def prepare_run(path: str | None, prompt: str | None, strategy: str | None, ln0_fold: str = "fp32", state=None,
                tokenizer_file: str | None = None, adapters=()) -> RunSetup:
    """The model at `path` (None: the bundled trained RWKV-7, with a prompt in its language), the tokenizer its
    vocabulary needs (World, a byte vocabulary, or `tokenizer_file`), and the prompt (default: a chat turn)."""
    notes = []
    if path is None:
        path = str(trained_model("v7"))
        notes.append(f"(no model given: running the bundled 2.7M-parameter RWKV-7 trained on Python's standard"
                     f" library, {path})")
        prompt = DEFAULT_PROMPT if prompt is None else prompt
    model = registry.load(path, strategy, ln0_fold, state, adapters)
    vocab = model.spec.vocab_size
    if tokenizer_file:
        tokenizer = HFTokenizer(tokenizer_file)
        note = check_fits(tokenizer, vocab)
        notes += [f"note: {note}"] if note else []
    elif vocab in NEOX_VOCABS:
        raise RwkvConvertError(f"this model has the GPT-NeoX vocabulary ({vocab} ids), not World; pass"
                               " --tokenizer 20B_tokenizer.json")
    else:
        tokenizer = default_tokenizer(vocab)
    return RunSetup(model, tokenizer, CHAT_PROMPT if prompt is None else prompt, notes)


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

