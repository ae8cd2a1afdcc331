"""Tokenizers: the RWKV World tokenizer (greedy longest match over UTF-8 bytes, as the pip package) and
Hugging Face `tokenizer.json` files (RWKV-4 Pile/Raven models use GPT-NeoX 20B's)."""

from __future__ import annotations

import ast
import codecs
from importlib import resources
from pathlib import Path

from .errors import RwkvConvertError, brief

END_OF_TEXT = 0  # id 0 is not in the vocabulary file: it ends a document


def world_vocab_path() -> Path:
    """The World vocabulary shipped in the `rwkv` wheel."""
    try:
        path = Path(str(resources.files("rwkv") / "rwkv_vocab_v20230424.txt"))
    except ModuleNotFoundError:
        raise RwkvConvertError("the `rwkv` package (which ships the World vocabulary) is not installed;"
                               " pip install rwkv==0.8.32") from None
    if not path.is_file():
        raise RwkvConvertError(f"World vocabulary not found at {path}; reinstall the `rwkv` package")
    return path


WORLD_TOKENS = 65530  # id 0 and the 65529 tokens of rwkv_vocab_v20230424.txt (World models pad to 65536)
BYTE_TOKENS = 257  # id 0 (end of text) and the 256 single bytes: also the World vocabulary's ids 0..256


def model_vocabulary(vocab_size: int) -> str:
    """The vocabulary a model without a tokenizer file is taken to have: "world" where it has room for the
    World vocabulary, else "bytes" (a byte-level model: ids 1..256 are single bytes, as in World, and the
    ids above are ones it never saw as text)."""
    too_small = vocabulary_too_small(vocab_size)
    if too_small:
        raise RwkvConvertError(too_small)
    return "world" if vocab_size >= WORLD_TOKENS else "bytes"


def vocabulary_too_small(vocab_size: int) -> str | None:
    """Why a model without a tokenizer file has no vocabulary of ours (None: it has one)."""
    if vocab_size >= BYTE_TOKENS:
        return None
    return (f"this model has {vocab_size} token ids, fewer than the {BYTE_TOKENS} of a byte-level vocabulary (end"
            " of text and 256 bytes): give its tokenizer, --tokenizer tokenizer.json")


def default_tokenizer(vocab_size: int) -> WorldTokenizer:
    """The World vocabulary for World-sized models, its single bytes for smaller ones."""
    return WorldTokenizer(vocab_size=None if model_vocabulary(vocab_size) == "world" else BYTE_TOKENS)


class WorldTokenizer:
    """Greedy longest-match tokenizer over bytes. With `vocab_size`, only ids below it are used (small
    test models carry the first V ids of the World vocabulary)."""

    def __init__(self, vocab_file: str | Path | None = None, vocab_size: int | None = None):
        self.id_to_bytes: dict[int, bytes] = {}
        path = Path(vocab_file) if vocab_file else world_vocab_path()
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            idx = int(line[: line.index(" ")])
            if vocab_size is not None and idx >= vocab_size:
                continue
            # The token is a Python str or bytes literal; literal_eval never runs code.
            token = ast.literal_eval(line[line.index(" "): line.rindex(" ")].strip())
            token = token.encode("utf-8") if isinstance(token, str) else token
            if len(token) != int(line[line.rindex(" "):]):
                raise RwkvConvertError(f"{path}: token {idx} has the wrong length")
            self.id_to_bytes[idx] = token
        self.vocab_size = vocab_size
        self._trie: dict = {}
        for idx, token in self.id_to_bytes.items():
            node = self._trie
            for byte in token:
                node = node.setdefault(byte, {})
            node[None] = idx  # the key None marks the end of a token

    def encode_bytes(self, data: bytes) -> list[int]:
        tokens, pos, n = [], 0, len(data)
        while pos < n:
            node, best, best_end, i = self._trie, None, pos, pos
            while i < n and data[i] in node:
                node = node[data[i]]
                i += 1
                if None in node:
                    best, best_end = node[None], i
            if best is None:
                raise RwkvConvertError(f"byte {data[pos]:#04x} has no token in this vocabulary")
            tokens.append(best)
            pos = best_end
        return tokens

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return b"".join(self.id_to_bytes.get(t, b"") for t in tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self.id_to_bytes.get(token, b"")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` package."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RwkvConvertError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions with a message
            raise RwkvConvertError(f"{path} is not a readable tokenizer.json: {brief(e)}") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def decode(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        return self._tok.decode([token]).encode("utf-8")


def gpt_neox_special_tokens(vocab: dict[str, int]) -> dict[str, str]:
    """GPT-NeoX's convention (the Pile models' 20B tokenizer), for the tokens the vocabulary has:
    <|endoftext|> begins, ends and stands for unknown text; <|padding|> pads."""
    special = {}
    if "<|endoftext|>" in vocab:
        special |= {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    if "<|padding|>" in vocab:
        special["pad_token"] = "<|padding|>"
    return special


def check_fits(tokenizer: HFTokenizer, model_vocab: int) -> str | None:
    """Refuses a tokenizer with ids the model has no row for; returns a note when the model has many ids the
    tokenizer never makes (most likely the wrong tokenizer; models pad their vocabulary by a few dozen)."""
    if tokenizer.vocab_size > model_vocab:
        raise RwkvConvertError(f"{tokenizer.path} has {tokenizer.vocab_size} token ids but the model's vocabulary has"
                               f" {model_vocab}: it is not this model's tokenizer; pass the one it was trained with")
    if tokenizer.vocab_size < model_vocab - 256:
        return (f"{tokenizer.path} has {tokenizer.vocab_size} token ids and the model {model_vocab}: check that it"
                " is the tokenizer the model was trained with")
    return None


class StreamDecoder:
    """Turns tokens into text as they arrive, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
