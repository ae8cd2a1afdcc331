"""The precision table (precision.py): one row per storage type, looked up by every format, runtime and verdict."""

from __future__ import annotations

import pytest

from rwkv_convert import precision
from rwkv_convert.bounds import TOLERANCES, stored_precision, tolerance_for
from rwkv_convert.errors import RwkvConvertError
from rwkv_convert.formats.gguf_file import MIXES, QUANTS, GgufOptions
from rwkv_convert.formats.gguf_size import PLAN_TYPES
from rwkv_convert.formats.onnx.export import DTYPES, OnnxOptions
from rwkv_convert.formats.onnx.export import QUANTS as ONNX_QUANTS
from rwkv_convert.strategy import allocate, parse_strategy

from .test_cli import assert_one_line_error, cli


def test_every_row_has_a_bound_and_every_bound_an_order():
    assert set(precision.BOUND_ORDER) == set(precision.BOUNDS) == set(TOLERANCES)
    assert {s.bound for s in precision.STORAGE} <= set(precision.BOUNDS)
    names = [s.name for s in precision.STORAGE]
    assert len(names) == len(set(names))
    for column in ("gguf", "onnx", "strategy", "torch_dtype"):
        words = [getattr(s, column) for s in precision.STORAGE if getattr(s, column)]
        assert len(words) == len(set(words)), column  # a word names one storage type in each format
    assert all(0 < s.bits <= 32 and s.runtimes for s in precision.STORAGE)


def test_what_the_gguf_writer_writes_is_in_the_table():
    single = [q for q in QUANTS if q not in MIXES and q[:4] not in ("q3_k", "q2_k")] + ["q3_k", "q2_k"]
    for q in single:
        row = precision.by_gguf(q.upper())
        assert row.bound in precision.BOUNDS, q
    assert [precision.by_gguf(t.upper()).bits for t in PLAN_TYPES] == sorted(
        (precision.by_gguf(t.upper()).bits for t in PLAN_TYPES), reverse=True)  # --target-size's ladder


def test_onnx_words_come_from_the_table():
    assert DTYPES == ("fp32", "fp16") and ONNX_QUANTS == ("none", "int8", "int4")
    assert precision.by_onnx("int4").bound == "int4-block" and precision.by_onnx("fp16").bound == "fp16"


def test_plans_and_stored_floats_are_judged_by_their_rows():
    plan = allocate(parse_strategy("cpu bf16i8 *1 -> cpu fp16"), 3)
    assert {p.precision for p in plan} == {"bf16i8", "fp16"}
    assert tolerance_for({p.precision for p in plan}) == ("bf16i8", precision.BOUNDS["bf16i8"])
    assert tolerance_for({"fp32", "q8_0", "int8-block"})[0] == "q8_0"

    class Spec:
        dtypes = {"float32": 3, "bfloat16": 5, "float64": 1}

    assert stored_precision(Spec) == "bf16"
    assert precision.float_bound("torch.float16") == "fp16" and precision.float_bound("float64") == "fp32"


@pytest.mark.parametrize("lookup, word", [(precision.storage, "q7_0"), (precision.by_gguf, "IQ4_XS"),
                                          (precision.by_onnx, "int3"), (precision.bound, "q1")])
def test_an_unknown_word_fails_in_one_place_listing_the_known_ones(lookup, word):
    with pytest.raises(RwkvConvertError, match=f"unknown .*{word!r}; rwkv-convert's precision table"):
        lookup(word)


@pytest.mark.parametrize("options, given, says", [
    (OnnxOptions, {"quant": "q6_k"}, "'q6_k' is GGUF Q6_K.*which --onnx-quant cannot store: it takes none, int8, int4"),
    (OnnxOptions, {"quant": "Q4_K"}, "GGUF Q4_K.*--onnx-quant cannot store"),
    (OnnxOptions, {"dtype": "bf16"}, "'bf16' is bfloat16, which --dtype cannot store: it takes fp32, fp16"),
    (GgufOptions, {"quant": "int4"}, "ONNX MatMulNBits int4.*which --quant cannot store: it takes f32"),
])
def test_a_storage_type_of_another_format_is_refused_by_name(options, given, says):
    with pytest.raises(RwkvConvertError, match=says):
        options(**given)
    with pytest.raises(RwkvConvertError, match="unknown --onnx-quant 'q9'; choose from none, int8, int4"):
        OnnxOptions(quant="q9")  # a word the table does not know: the option's own list


def test_the_cli_refuses_a_foreign_storage_type_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "m.onnx"
    assert_one_line_error(cli("convert", "bundled:v7", "--to", "onnx", "--onnx-quant", "q6_k", "-o", out),
                          "GGUF Q6_K.*--onnx-quant cannot store: it takes none, int8, int4")
    assert_one_line_error(cli("convert", "bundled:v7", "--to", "gguf", "--quant", "INT4", "-o", tmp_path / "m.gguf"),
                          "ONNX MatMulNBits int4.*--quant cannot store")
    assert list(tmp_path.iterdir()) == []


def test_every_quality_scheme_stores_a_type_of_the_table():
    from rwkv_convert.quality import SCHEMES

    rows = {name: s.storage for name, s in SCHEMES.items()}
    assert rows["gguf-q6_k"].gguf == "Q6_K" and rows["fp32i8"].name == "i8" and rows["onnx-int4"].bits == 4
    assert all(r.bound in precision.BOUNDS for r in rows.values())
