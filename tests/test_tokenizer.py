"""The World tokenizer against the pip package's TRIE_TOKENIZER."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkv_convert.tokenizer import StreamDecoder, WorldTokenizer, world_vocab_path


@pytest.fixture(scope="module")
def both():
    return WorldTokenizer(), TRIE_TOKENIZER(str(world_vocab_path()))


TEXTS = ["Hello world!", "User: 你好，世界。\n\nAssistant: 🙂 ñ", "\x00\x01\x7f", "   spaces  \t tabs",
         "The quick brown fox jumps over the lazy dog. " * 5, "日本語のテキスト", "<|endoftext|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_equals_the_pip_package(both, text):
    ours, pip = both
    assert ours.encode(text) == pip.encode(text)
    assert ours.decode(ours.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
@pytest.mark.slow
def test_round_trip_and_equal_to_pip_on_any_text(text):
    ours, pip = _cached()
    assert ours.encode(text) == pip.encode(text)
    assert ours.decode(ours.encode(text)) == text


_CACHE = {}


def _cached():
    if not _CACHE:
        _CACHE["t"] = (WorldTokenizer(), TRIE_TOKENIZER(str(world_vocab_path())))
    return _CACHE["t"]


def test_small_vocabulary_only_uses_its_ids():
    small = WorldTokenizer(vocab_size=512)
    tokens = small.encode("Hello 你好 🙂")
    assert max(tokens) < 512
    assert small.decode(tokens) == "Hello 你好 🙂"


def test_stream_decoder_holds_back_split_characters():
    small = WorldTokenizer(vocab_size=300)  # ids 1..256 are single bytes: a CJK char is three tokens
    tokens = small.encode("你")
    assert len(tokens) == 3
    dec = StreamDecoder(small)
    pieces = [dec.feed(t) for t in tokens]
    assert pieces[:2] == ["", ""] and pieces[2] == "你"
