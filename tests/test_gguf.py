"""GGUF export checked in llama.cpp itself (llama-cpp-python) and with the gguf package's reader."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import rwkv_convert
from rwkv_convert.bounds import TOLERANCES
from rwkv_convert.errors import RwkvConvertError, UnsupportedError
from rwkv_convert.fixtures import fixture_path, make_state_dict
from rwkv_convert.metrics import compare

from .conftest import save_atomic, tokens_for
from .test_cli import assert_one_line_error, cli
from .test_formats import gguf_py_tensor_names

pytestmark = pytest.mark.slow  # llama.cpp runs every file

if os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA") == "1":  # CI: a missing llama-cpp-python must fail, not skip
    import gguf
    import llama_cpp  # noqa: F401

    from rwkv_convert.runtimes import llama_cpp as llama_runtime
else:
    gguf = pytest.importorskip("gguf")
    llama_runtime = pytest.importorskip("rwkv_convert.runtimes.llama_cpp")
    pytest.importorskip("llama_cpp")

VARIANTS = ["v5.2", "v6", "v7", "v7-layer0-v"]  # v5.2 is written as rwkv6 (zero LoRAs)
TOKENS = tokens_for(512)


def llama_logits(path, chunk: int | None) -> torch.Tensor:
    runner = llama_runtime.LlamaCppSession(path, n_ctx=128)
    chunks = [TOKENS] if chunk is None else [TOKENS[i:i + chunk] for i in range(0, len(TOKENS), chunk)]
    return runner.logits(chunks)


@pytest.fixture(scope="module")
def references(fixture_dir):
    return {(v, dt): rwkv_convert.load(fixture_path(v, dt, directory=fixture_dir)).forward(TOKENS, full_output=True)[0]
            for v in VARIANTS for dt in ("fp32", "bf16")}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_f32_gguf_runs_in_llama_cpp_like_the_reference(variant, dtype, references, fixture_dir, tmp_path):
    (out,) = rwkv_convert.convert(fixture_path(variant, dtype, directory=fixture_dir), "gguf", tmp_path / "m.gguf",
                                  quant="f32")
    ref = references[(variant, dtype)]
    for chunk in (None, 1, 7):  # one batch, token by token, chunks of 7 with the state carried
        assert (llama_logits(out, chunk) - ref).abs().max().item() <= 1e-3, chunk
    ours = rwkv_convert.load(out).forward(TOKENS, full_output=True)[0]
    assert (ours - llama_logits(out, None)).abs().max().item() <= 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("quant,key", [("f16", "fp16"), ("bf16", "bf16"), ("q8_0", "q8_0")])
def test_reduced_precision_ggufs_within_the_tolerance_table(variant, dtype, quant, key, references, fixture_dir,
                                                            tmp_path):
    (out,) = rwkv_convert.convert(fixture_path(variant, dtype, directory=fixture_dir), "gguf", tmp_path / "m.gguf",
                                  quant=quant)
    tol = TOLERANCES[key]
    llama = llama_logits(out, None)
    for who, cand, ref in (("llama.cpp", llama, references[(variant, dtype)]),
                           ("our reader", rwkv_convert.load(out).forward(TOKENS, full_output=True)[0], llama)):
        max_abs, rel_l2, kl, top1 = compare(ref, cand)
        assert max_abs <= tol.max_abs and rel_l2 <= tol.rel_l2 and kl <= tol.kl and top1 >= tol.top1, \
            (who, quant, max_abs, rel_l2, kl, top1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_q8_0_top1_agreement_over_eight_streams(variant, dtype, fixture_dir, tmp_path):
    """Top-1 over 8 x 64 tokens (one stream's 64 positions move it in steps of 1.6%). Measured pooled:
    94.5% (v6 bf16) to 96.9%; the flips sit at reference top-2 margins under 0.5 of these random models."""
    src = fixture_path(variant, dtype, directory=fixture_dir)
    (out,) = rwkv_convert.convert(src, "gguf", tmp_path / "m.gguf", quant="q8_0")
    model, runner = rwkv_convert.load(src), llama_runtime.LlamaCppSession(out, n_ctx=128)
    streams = [tokens_for(512, seed=1234 + s) for s in range(8)]
    ref = torch.cat([model.forward(t, full_output=True)[0] for t in streams])
    cand = torch.cat([runner.logits([t]) for t in streams])
    _, _, kl, top1 = compare(ref, cand)
    assert top1 >= 0.93 and kl <= TOLERANCES["q8_0"].kl, (top1, kl)


def test_models_load_without_llama_cpps_extra_buffer_types(fixture_dir, tmp_path):
    """On CPUs with AMX the extra (repacking) buffer types segfault quantized RWKV models on multi-token batches;
    Llama() ignores a use_extra_bufts keyword, so the runner sets it on the model parameters itself."""
    (out,) = rwkv_convert.convert(fixture_path("v7", directory=fixture_dir), "gguf", tmp_path / "m.gguf", quant="q8_0")
    runner = llama_runtime.LlamaCppSession(out, n_ctx=128)
    assert runner.llm.model_params.use_extra_bufts is False
    assert runner.logits([tokens_for(512)[:64]]).shape == (64, 512)  # a multi-token batch of a quantized model
    from llama_cpp import llama_cpp as bindings
    assert bindings.llama_model_default_params().use_extra_bufts is True  # the library's default is left as it was


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_four_and_five_bit_ggufs_run_and_beat_chance(quant, references, fixture_dir, tmp_path):
    (out,) = rwkv_convert.convert(fixture_path("v7", directory=fixture_dir), "gguf", tmp_path / "m.gguf", quant=quant)
    logits = llama_logits(out, None)
    assert torch.isfinite(logits).all()
    _, _, kl, top1 = compare(references[("v7", "fp32")], logits)
    assert top1 > 5 / 512, top1  # random guessing agrees 1/512 of the time
    ours = rwkv_convert.load(out).forward(TOKENS, full_output=True)[0]  # our reader of the same file
    assert torch.isfinite(ours).all() and compare(logits, ours)[3] > 5 / 512


@pytest.mark.parametrize("variant", ["v6", "v7"])
def test_k_quants_run_in_llama_cpp_and_fall_back_where_rows_are_not_256s(variant, tmp_path):
    """Q6_K / Q5_K / Q4_K from our quantizer: llama.cpp runs them as our reader dequantizes them (its own
    activation rounding aside), better than the 32-block types of the same size; a v6 FFN of 896 columns
    (not whole 256-value super-blocks) falls back to llama.cpp's choice, with a note."""
    src = save_atomic(make_state_dict(variant, n_layer=2, n_embd=256, vocab=512), tmp_path / "m.pth")
    ref = rwkv_convert.load(src).forward(TOKENS, full_output=True)[0]
    kl = {}
    for quant in ("q6_k", "q5_k", "q4_k", "q4_0"):
        out = tmp_path / f"{quant}.gguf"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rwkv_convert.convert(src, "gguf", out, quant=quant)
        notes = [str(w.message) for w in caught if "super-blocks" in str(w.message)]
        assert bool(notes) == (variant == "v6" and quant != "q4_0"), notes
        reader = gguf.GGUFReader(out)
        types = {t.tensor_type.name for t in reader.tensors}
        assert quant.upper() in types
        if notes:  # the 896-column ffn.value rows
            assert gguf.GGMLQuantizationType[reader_type(reader, "blk.0.channel_mix_value.weight")].name != \
                quant.upper()
        llama = llama_logits(out, None)
        ours = rwkv_convert.load(out).forward(TOKENS, full_output=True)[0]
        assert torch.isfinite(llama).all()
        assert compare(ours, llama)[1] < 0.05, quant  # rel L2: llama.cpp rounds activations to 8 bits
        kl[quant] = compare(ref, llama)[2]
    assert kl["q6_k"] < kl["q5_k"] < kl["q4_k"] < kl["q4_0"], kl


def reader_type(reader, name: str) -> str:
    return next(t.tensor_type.name for t in reader.tensors if t.name == name)


QUANTIZED = {"token_embd", "output", "time_mix_key", "time_mix_value", "time_mix_receptance", "time_mix_gate",
             "time_mix_output", "channel_mix_key", "channel_mix_value", "channel_mix_receptance"}


def expected_tensor_set(arch: str, n_layer: int) -> dict[str, str]:
    """llama.cpp's rwkv6/rwkv7 tensor list as gguf-py declares it (less rwkv6's optional per-mix lerps, which
    the fused lerp replaces), with the types a --quant q8_0 file must have: the large matrices Q8_0, the rest
    F32. Norms have a weight and a bias."""
    names = {}
    for template in gguf_py_tensor_names(arch):
        for i in range(n_layer) if "{bid}" in template else [0]:
            name = template.format(bid=i)
            kind = name.split(".")[-1]
            parts = ("weight", "bias") if kind.endswith(("norm", "norm_2", "time_mix_ln")) else ("weight",)
            names |= {f"{name}.{p}": "Q8_0" if kind in QUANTIZED else "F32" for p in parts}
    return names


@pytest.mark.parametrize("variant,arch", [("v5.2", "rwkv6"), ("v6", "rwkv6"), ("v7", "rwkv7"),
                                          ("v7-layer0-v", "rwkv7")])
def test_gguf_reader_lists_exactly_llama_cpps_tensor_set(variant, arch, fixture_dir, tmp_path):
    (out,) = rwkv_convert.convert(fixture_path(variant, directory=fixture_dir), "gguf", tmp_path / "m.gguf",
                                  quant="q8_0")
    reader = gguf.GGUFReader(out)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == expected_tensor_set(arch, 7)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == arch


def test_tokenizer_in_the_file_round_trips_like_the_pip_package(tmp_path):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_convert.tokenizer import world_vocab_path

    sd = make_state_dict("v7", n_layer=1, n_embd=64, vocab=65536)
    (out,) = rwkv_convert.convert(save_atomic(sd, tmp_path / "full-vocab.pth"), "gguf", tmp_path / "m.gguf",
                                  quant="f16")
    runner = llama_runtime.LlamaCppSession(out, n_ctx=64)
    pip = TRIE_TOKENIZER(str(world_vocab_path()))
    for text in ["Hello world!", "User: 你好，世界。\n\nAssistant: 🙂 ñ", "   spaces  \t tabs", "日本語のテキスト",
                 "The quick brown fox jumps over the lazy dog.", "\\x00 \\n literal backslashes"]:
        tokens = runner.tokenize(text)
        assert tokens == pip.encode(text), text
        assert runner.detokenize(tokens) == text


def test_a_byte_level_model_gets_bytes_and_unused_ids_not_world_tokens(tmp_path):
    """V=320: ids 0 (end of text) and 1..256 (the bytes) are the model's; 257..319 are marked unused, so
    llama.cpp never makes them from text (the World vocabulary's multi-byte tokens there would be)."""
    gguf = pytest.importorskip("gguf")
    src = save_atomic(make_state_dict("v6", n_layer=1, n_embd=64, vocab=320), tmp_path / "bytes.pth")
    (out,) = rwkv_convert.convert(src, "gguf", tmp_path / "m.gguf", quant="f32")
    reader = gguf.GGUFReader(out)
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in
              reader.fields["tokenizer.ggml.tokens"].data]
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in
             reader.fields["tokenizer.ggml.token_type"].data]
    assert len(tokens) == 320 and tokens[257:] == [f"[PAD{i}]" for i in range(257, 320)]
    assert set(types[257:]) == {gguf.TokenType.UNUSED} and set(types[1:257]) == {gguf.TokenType.NORMAL}
    assert "tokenizer.chat_template" not in reader.fields  # the World chat format is for World models
    text = "hello, 你好 🙂\n\n"
    assert llama_runtime.LlamaCppSession(out, n_ctx=64).tokenize(text) == [b + 1 for b in text.encode("utf-8")]


def test_a_given_bpe_tokenizer_is_embedded_as_llama_cpps_gpt2_model(tmp_path, neox_tokenizer):
    """--tokenizer tokenizer.json (byte-level BPE): llama.cpp tokenizes as the tokenizers library does."""
    from tokenizers import Tokenizer

    src = save_atomic(make_state_dict("v7", n_layer=1, n_embd=64, vocab=448), tmp_path / "bpe.pth")
    (out,) = rwkv_convert.convert(src, "gguf", tmp_path / "m.gguf", quant="f32", tokenizer=str(neox_tokenizer))
    runner = llama_runtime.LlamaCppSession(out, n_ctx=64)
    library = Tokenizer.from_file(str(neox_tokenizer))
    for text in ["hello world", "The quick brown fox jumps over the lazy dog.", "numbers 12345 and 3.14159",
                 "ünïcödé café 你好 🙂", "tabs\t and  spaces"]:
        assert runner.tokenize(text) == library.encode(text).ids, text
        assert runner.detokenize(library.encode(text).ids) == library.decode(library.encode(text).ids)


def test_vocabularies_gguf_cannot_hold_are_refused(tmp_path, neox_tokenizer):
    tiny = save_atomic(make_state_dict("v6", n_layer=1, n_embd=64, vocab=200), tmp_path / "tiny.pth")
    assert_one_line_error(cli("convert", tiny, "--to", "gguf", "-o", tmp_path / "tiny.gguf"),
                          "200 token ids, fewer than the 257 of a byte-level vocabulary")
    small = save_atomic(make_state_dict("v6", n_layer=1, n_embd=64, vocab=300), tmp_path / "small.pth")
    assert_one_line_error(cli("convert", small, "--to", "gguf", "--tokenizer", neox_tokenizer, "-o",
                              tmp_path / "small.gguf"), r"has \d+ token ids but the model's vocabulary has 300")
    from tokenizers import Tokenizer, models, pre_tokenizers

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.save(str(tmp_path / "wordpiece.json"))
    assert_one_line_error(cli("convert", small, "--to", "gguf", "--tokenizer", tmp_path / "wordpiece.json", "-o",
                              tmp_path / "wp.gguf"), "WordPiece tokenizer without a byte-level pre-tokenizer")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("variant,pattern", [
    ("v4", "no architecture for RWKV-4"), ("v5.1", "no architecture for RWKV-5.1"),
    ("v5.2-state", "state-tuned"),
    ("v7-deepembed", "RWKV-7a model and llama.cpp.s rwkv7 \\(GGUF\\) has no per-token tables"),
    ("v7-dea", "RWKV-7b model .* DEA.s qkv.k_emb"),
])
def test_refusals_are_one_line_and_leave_no_file(variant, pattern, fixture_dir, tmp_path):
    proc = cli("convert", fixture_path(variant, directory=fixture_dir), "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert_one_line_error(proc, pattern)
    assert list(tmp_path.iterdir()) == []


def test_v7_head_size_llama_cpp_cannot_run_is_refused(tmp_path):
    src = save_atomic(make_state_dict("v7", n_layer=1, n_embd=128, head_size=32), tmp_path / "hs32.pth")
    target = tmp_path / "out"
    target.mkdir()
    assert_one_line_error(cli("convert", src, "--to", "gguf", "-o", target / "m.gguf"), "head size 32")
    assert list(target.iterdir()) == []


def test_width_not_a_multiple_of_the_block_is_refused(tmp_path):
    sd = make_state_dict("v6", n_layer=1, n_embd=80, head_size=16, vocab=512, ranks={"maa": 8, "decay": 8})
    src = save_atomic(sd, tmp_path / "c80.pth")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(UnsupportedError, match="not a multiple of 32"):
        rwkv_convert.convert(src, "gguf", target / "m.gguf", quant="q8_0")
    assert list(target.iterdir()) == []
    rwkv_convert.convert(src, "gguf", target / "m.gguf", quant="f16")  # float types have no block size


def test_verify_runs_ggufs_in_llama_cpp(fixture_dir, tmp_path):
    src = fixture_path("v7", directory=fixture_dir)
    (out,) = rwkv_convert.convert(src, "gguf", tmp_path / "m.gguf", quant="q8_0")
    proc = cli("verify", out, "--reference", src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "llama.cpp" in proc.stdout and "tolerance  q8_0" in proc.stdout
    with pytest.raises(RwkvConvertError, match="not a readable GGUF"):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF" + b"\0" * 10)
        rwkv_convert.load(bad)


def test_strategy_picks_per_layer_types(fixture_dir, tmp_path):
    (out,) = rwkv_convert.convert(fixture_path("v7", directory=fixture_dir), "gguf", tmp_path / "m.gguf",
                                  strategy="cpu fp16i8 *4 -> cpu fp16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.time_mix_key.weight"] == types["blk.3.channel_mix_key.weight"] == "Q8_0"
    assert types["blk.4.time_mix_key.weight"] == types["output.weight"] == "F16"
    assert types["token_embd.weight"] == "Q8_0"  # the embedding follows slot 0
    assert np.isfinite(llama_logits(out, None).numpy()).all()


@pytest.mark.parametrize("variant,shape", [("v7", dict(n_layer=2, n_embd=128)),
                                           ("v6", dict(n_layer=7, n_embd=192)),
                                           ("v5.2", dict(n_layer=2, n_embd=128))])
def test_llama_cpps_own_converter_reads_our_hf_export_and_we_read_its_gguf(variant, shape, tmp_path):
    """Upstream interop both ways: llama.cpp's convert_hf_to_gguf.py (same release) converts our hf directory
    (RWKV-7: the fla-hub layout; 6 and 5.2: Rwkv6ForCausalLM, 5.2 as 6 with zero LoRAs), llama.cpp runs the
    result, and our GGUF reader reads it back. v6 with other LoRA ranks than the converter's table assumes
    (32/64) and more than 6 layers (its rescale)."""
    import subprocess
    import sys

    converter = os.environ.get("RWKV_CONVERT_LLAMA_CONVERTER")
    if not converter:
        if os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA") == "1":
            pytest.fail("CI must set RWKV_CONVERT_LLAMA_CONVERTER (see .ci/run)")
        pytest.skip("RWKV_CONVERT_LLAMA_CONVERTER (llama.cpp's convert_hf_to_gguf.py) not set")

    # its World vocabulary loader needs the full 65536-token vocabulary
    src = save_atomic(make_state_dict(variant, vocab=65536, **shape), tmp_path / "src.pth")
    rwkv_convert.convert(src, "safetensors", tmp_path / "hf", layout="hf", dtype="fp32")
    out = tmp_path / "upstream.gguf"
    proc = subprocess.run([sys.executable, converter, str(tmp_path / "hf"), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same metadata as our own GGUF of the source, but for the differences we mean
    (direct,) = rwkv_convert.convert(src, "gguf", tmp_path / "direct.gguf", quant="f32")
    theirs, mine = gguf_metadata(out), gguf_metadata(direct)
    arch = "rwkv7" if variant == "v7" else "rwkv6"
    deliberate = {
        "general.name",  # theirs: the directory's name; ours: the source file's stem
        "rwkv_convert.tensor_crc32",  # ours: each tensor's CRC-32
        "rwkv_convert.metadata_crc32",  # ours: the CRC-32 of our own metadata
        f"{arch}.rescale_every_n_layers",  # rwkv6: theirs 6 with att.output/ffn.value divided, ours 0 and undivided
        "tokenizer.chat_template",  # v7: theirs the hf directory's (rwkv7-hf's), ours llama.cpp's rwkv-world one
        "tokenizer.ggml.padding_token_id",  # rwkv6: ours names <s> (0) as padding too, theirs none
    }
    assert {k: v for k, v in theirs.items() if k not in deliberate} == \
        {k: v for k, v in mine.items() if k not in deliberate}
    assert mine["tokenizer.ggml.padding_token_id"] == 0 and mine.get(f"{arch}.rescale_every_n_layers") in (0, None)
    if variant != "v7":  # from llama.cpp's own template file, as its converter writes it for rwkv6
        assert mine["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
    tokens = tokens_for(65536)
    ref = rwkv_convert.load(src).forward(tokens, full_output=True)[0]
    ours = rwkv_convert.load(out).forward(tokens, full_output=True)[0]
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (llama_runtime.LlamaCppSession(out, n_ctx=128).logits([tokens]) - ref).abs().max().item() <= 1e-3


def gguf_metadata(path) -> dict:
    """Every key-value of a GGUF but the file-format ones, arrays as lists."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def test_v5_2_of_another_shape_runs_as_rwkv6(tmp_path):
    src = save_atomic(make_state_dict("v5.2", n_layer=2, n_embd=256, vocab=1000), tmp_path / "v52.pth")
    (out,) = rwkv_convert.convert(src, "gguf", tmp_path / "m.gguf", quant="f32")
    tokens = tokens_for(1000)
    ref = rwkv_convert.load(src).forward(tokens, full_output=True)[0]
    runner = llama_runtime.LlamaCppSession(out, n_ctx=128)
    assert (runner.logits([tokens]) - ref).abs().max().item() <= 1e-3
    assert (runner.logits([tokens[:20], tokens[20:]]) - ref).abs().max().item() <= 1e-3
