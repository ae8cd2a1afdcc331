"""Strategy strings: parsing, the package's normalised form, layer allocation, precise errors."""

from __future__ import annotations

import pytest
import torch

from rwkv_convert.errors import RwkvConvertError
from rwkv_convert.strategy import allocate, parse_strategy


def layout(strategy: str, n_layer: int) -> list[str]:
    return [f"{p.device} {p.weights}{'+' if p.stream else ''}" for p in allocate(parse_strategy(strategy), n_layer)]


def test_normalised_form_matches_the_package():
    assert str(parse_strategy("cuda fp16i8 *10->cuda  fp16")) == "cuda fp16i8 *10 -> cuda fp16"
    assert str(parse_strategy(" cpu fp32 ")) == "cpu fp32"


@pytest.mark.parametrize("strategy,expected", [
    # reference results for L = 4 (5 slots), from the package
    ("cuda fp16i8 *2 -> cpu fp32", ["cuda i8"] * 2 + ["cpu fp32"] * 3),
    ("cuda:0 fp16 -> cuda:1 fp16 -> cpu fp32", ["cuda:0 fp16"] + ["cuda:1 fp16"] * 2 + ["cpu fp32"] * 2),
    ("cuda fp16i8 -> cpu fp32 *1", ["cuda i8"] * 4 + ["cpu fp32"]),
    ("cuda fp16 *2+", ["cuda fp16"] * 2 + ["cuda fp16+"] * 3),
    ("cpu fp32 *10 -> cpu bf16", ["cpu fp32"] * 5),
])
def test_allocation_reference_cases(strategy, expected):
    assert layout(strategy, 4) == expected


def test_explicit_zero_neither_crashes_nor_takes_leftovers():
    # The package raises ZeroDivisionError on the first and gives the second's leftovers to the *0 segment.
    assert layout("cuda fp16 *0 -> cpu fp32", 4) == ["cpu fp32"] * 5
    assert layout("cpu bf16 *2 -> cpu fp32 *0", 4) == ["cpu bf16"] * 5


def test_fp16_anywhere_turns_on_the_rescale_flag():
    assert parse_strategy("cpu fp32 *2 -> cuda fp16i8").uses_fp16
    assert not parse_strategy("cpu bf16").uses_fp16


def test_placement_dtypes():
    first = allocate(parse_strategy("cpu bf16i8"), 1)[0]
    assert (first.atype, first.weights) == (torch.bfloat16, "i8")


@pytest.mark.parametrize("text,pattern", [
    ("cpu", "has no dtype"),
    ("cpu fp64", r"'fp64' \(segment 1\) is not a dtype"),
    ("cpu fp16i4", "i4 weights do not exist; use fp16i8 or fp16"),
    ("cpu fp16 -> tpu fp16", r"'tpu' \(segment 2\) is not a device"),
    ("cpu fp16 *a", "is not a layer count"),
    ("cpu fp16 *2 extra", r"'extra' \(segment 1\)"),
    ("cpu fp16 -> ", "segment 2 is empty"),
    ("cuda fp16 *1+ -> cpu fp32 *1+", "only one segment may stream"),
    ("", "empty strategy"),
])
def test_malformed_strings_quote_the_string_and_the_token(text, pattern):
    with pytest.raises(RwkvConvertError, match=pattern) as info:
        parse_strategy(text)
    if text.strip():
        assert f'"{text}"' in str(info.value)
