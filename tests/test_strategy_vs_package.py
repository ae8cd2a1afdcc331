"""Layer allocation against the rwkv pip package's own code, for hand-picked and random strategy strings.

The package computes the allocation inside RWKV.__init__, between its "Compute strategy" and "Load weights"
markers, using nothing but the strategy string and n_layer. We run exactly that source text (read from the
installed package) with any device names, which the package itself could only do on a machine with those
devices."""

from __future__ import annotations

import inspect
import textwrap
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_convert.errors import RwkvConvertError
from rwkv_convert.strategy import allocate, parse_strategy


def _package_allocation_source() -> str:
    import os

    os.environ.setdefault("RWKV_JIT_ON", "0")
    from rwkv.model import RWKV

    src = inspect.getsource(RWKV.__init__)
    start = src.index("####################### Compute strategy")
    end = src.index("####################### Load weights")
    return textwrap.dedent(src[start:end].split("\n", 1)[1])


SOURCE = _package_allocation_source()


def package_allocation(strategy: str, n_layer: int) -> list[tuple]:
    normalised = ("->".join(x.strip() for x in strategy.split("->"))).replace("->", " -> ")
    me = types.SimpleNamespace()
    scope = {"self": me, "strategy": normalised, "args": types.SimpleNamespace(n_layer=n_layer), "torch": torch,
             "types": types, "prxxx": lambda *a, **k: None}
    exec(SOURCE, scope)  # noqa: S102 - the installed package's own allocation code
    return [(s.device, s.atype, s.wtype, s.stream) for s in me.strategy]


def ours(strategy: str, n_layer: int) -> list[tuple]:
    return [(p.device, p.atype, torch.uint8 if p.weights == "i8" else p.atype, p.stream)
            for p in allocate(parse_strategy(strategy), n_layer)]


HAND_PICKED = [
    "cpu fp32", "cpu bf16", "cuda fp16", "cuda fp16i8", "cpu fp32i8", "mps fp32", "cuda:0 fp16",
    "cuda fp16 *10", "cuda fp16 *10 -> cpu fp32", "cuda fp16i8 *10 -> cuda fp16", "cuda fp16 *20 -> cpu fp32",
    "cuda fp16i8 *10+", "cuda fp16 *0+", "cuda fp16 *3+", "cuda fp16 *1+", "cuda:0 fp16 -> cuda:1 fp16",
    "cuda:0 fp16 -> cuda:1 fp16 -> cpu fp32", "cuda fp16i8 -> cpu fp32 *1", "cuda fp16i8 *2 -> cpu fp32",
    "cuda fp16 *6 -> cuda fp16i8 *6 -> cpu fp32", "cuda fp16 -> cuda fp16i8 -> cpu bf16 -> cpu fp32",
    "cuda:0 fp16 *4 -> cuda:1 fp16 *4 -> cuda:2 fp16 *4 -> cpu fp32", "cuda fp16 *100", "cpu fp32 *1 -> cpu bf16",
    "cpu fp32 -> cpu bf16 *1", "cuda fp16 *4 -> cuda fp32 *4", "cuda fp16 *4 -> cuda fp32 *4 -> cpu fp32 *4",
    "cuda fp16 *2 -> cuda fp16i8 *2+", "cuda fp16i8 *3 -> cuda fp16 *3+", "cuda bf16 *5+",
    "cuda fp32i8 *7 -> cpu fp32i8", "cuda bf16i8 -> cuda fp16i8", "cpu fp16 *2 -> cuda fp16 *2 -> cpu fp16",
    "cuda fp16 *25", "cuda fp16 *24 -> cpu fp32", "cuda fp16 *23 -> cpu fp32", "cuda fp16 *8 -> cpu fp32 *8",
    "cuda fp16 *8 ->cpu fp32", " cuda fp16 -> cpu fp32 ", "mps fp16 *3 -> cpu fp32",
    "cuda fp16 *5 -> cuda fp16i8 *5 -> cuda fp16 *5+", "cuda fp16 -> cpu fp32 *3 -> cuda fp16i8 *2",
]
# Where the package crashes or does what it should not (reference/strategy-and-int8.md), ours is pinned here.
DOCUMENTED = {
    ("cuda fp16 *0 -> cpu fp32", 4): [("cpu", torch.float32, torch.float32, False)] * 5,  # package: ZeroDivision
    ("cpu bf16 *2 -> cpu fp32 *0", 4): [("cpu", torch.bfloat16, torch.bfloat16, False)] * 5,  # leftovers into *0
}
N_LAYERS = (1, 4, 7, 24)


@pytest.mark.parametrize("strategy", HAND_PICKED)
@pytest.mark.parametrize("n_layer", N_LAYERS)
def test_allocation_equals_the_package(strategy, n_layer):
    assert ours(strategy, n_layer) == package_allocation(strategy, n_layer)


@pytest.mark.parametrize("case", list(DOCUMENTED))
def test_package_bugs_have_our_documented_behaviour(case):
    strategy, n_layer = case
    assert ours(strategy, n_layer) == DOCUMENTED[case]
    try:
        theirs = package_allocation(strategy, n_layer)
    except ZeroDivisionError:
        return
    assert theirs != DOCUMENTED[case]


def test_we_accept_extra_spaces_that_the_package_rejects():
    # The package's regex wants exactly one space between tokens; we normalise any whitespace.
    assert str(parse_strategy("cuda  fp16   *8 ->cpu fp32")) == "cuda fp16 *8 -> cpu fp32"


def test_streaming_with_a_countless_segment_is_an_error_not_an_empty_segment():
    assert package_allocation("cuda fp16 *2+ -> cpu fp32", 4)[-1][0] == "cuda"  # the package: cpu gets nothing
    with pytest.raises(RwkvConvertError, match='segment 2 "cpu fp32" has no \\*N'):
        ours("cuda fp16 *2+ -> cpu fp32", 4)


segment = st.tuples(
    st.sampled_from(["cpu", "cuda", "cuda:1", "mps"]),
    st.sampled_from(["fp32", "fp16", "bf16", "fp32i8", "fp16i8", "bf16i8"]),
    st.one_of(st.none(), st.integers(0, 30).map(lambda n: f"*{n}"), st.integers(0, 30).map(lambda n: f"*{n}+")),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(segment, min_size=1, max_size=4), st.sampled_from(N_LAYERS))
def test_random_strategies_match_the_package_or_a_documented_rule(segments, n_layer):
    if sum(1 for s in segments if s[2] and s[2].endswith("+")) > 1:
        segments = [(d, t, c.rstrip("+") if c else c) for d, t, c in segments]
    text = " -> ".join(" ".join(x for x in s if x) for s in segments)
    has_zero = any(c in ("*0", "*0+") for _, _, c in segments)
    try:
        mine = ours(text, n_layer)
    except RwkvConvertError as e:
        # Our only refusal of a well-formed string: a count-less segment beside a streaming one.
        assert "streams all remaining layers" in str(e)
        return
    try:
        theirs = package_allocation(text, n_layer)
    except ZeroDivisionError:
        assert has_zero
        return
    if mine != theirs:
        assert has_zero, (text, n_layer)
