"""safetensors exports checked in their real clients (transformers' RwkvForCausalLM for v4, the rwkv7-hf
package for v7), against RWKV-Runner's documented web-rwkv rules, and read back by us; prepared files equal
the in-memory conversion bit for bit; malformed files get one line."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import rwkv_convert
from rwkv_convert.bounds import TOLERANCES
from rwkv_convert.errors import RwkvConvertError, UnsupportedError
from rwkv_convert.fixtures import VARIANTS, fixture_path, make_state_dict
from rwkv_convert.formats.safetensors_io import read_header
from rwkv_convert.metrics import compare

from .conftest import save_atomic, tokens_for
from .test_cli import assert_one_line_error, cli

TOKENS = tokens_for(512)
SPLIT = 20


@pytest.fixture(scope="module")
def references(fixture_dir):
    return {v: rwkv_convert.load(fixture_path(v, directory=fixture_dir)).forward(TOKENS, full_output=True)[0]
            for v in VARIANTS}


# ---- web-rwkv ----------------------------------------------------------------------------------------
def runner_expectation(sd: dict, version: str) -> dict[str, tuple[str, tuple]]:
    """What RWKV-Runner's convert_safetensors.py writes, from its documented rules (written independently
    of rwkv_convert/formats/web_rwkv.py): name -> (dtype, shape)."""
    transposed = ["time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2", "w1", "w2", "a1", "a2", "g1",
                  "g2", "v1", "v2", "time_state", "lora.0"]
    out = {}
    for k, v in sd.items():
        shape = list(v.shape)
        # 5.1: RWKV-Runner expands decay and bonus; its log-form bonus (time_first) too here, as web-rwkv reads every
        # v5 file as 5.2 (left [H], web-rwkv 0.8 panics: tests/test_web_rwkv_client.py)
        if version == "5.1" and k.endswith(("att.time_decay", "att.time_faaaa", "att.time_first")):
            heads = shape[0]
            shape = [heads, sd["blocks.0.att.key.weight"].shape[0] // heads]
        name = k.replace("time_faaaa", "time_first").replace("time_maa", "time_mix").replace(
            "lora_A", "lora.0").replace("lora_B", "lora.1").lower()
        for t in transposed:
            if t in name:
                shape[-2], shape[-1] = shape[-1], shape[-2]
                break
        out[name] = ("F16", tuple(shape))
    return out


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "v5.0"])  # 5.0: refused (test_web_rwkv_client)
def test_web_rwkv_layout_matches_runner_rules_and_reads_back(variant, references, fixture_dir, tmp_path):
    src = fixture_path(variant, directory=fixture_dir)
    out, *state = rwkv_convert.convert(src, "safetensors", tmp_path / "m.st", layout="web-rwkv")
    entries, meta, _ = read_header(out)
    sd = torch.load(src, weights_only=True)
    assert bool(state) == any("time_state" in k for k in sd)  # a learned state goes beside the model (m-state.st)
    sd = {k: v for k, v in sd.items() if "time_state" not in k}
    version = rwkv_convert.load(src).spec.version
    assert {k: (str(d).removeprefix("torch.").replace("float16", "F16"), s) for k, (d, s, _, _) in entries.items()} \
        == runner_expectation(sd, version)
    assert meta["format"] == "pt"
    model = rwkv_convert.load(out)
    assert model.spec.version == version  # 5.1's expansion undone, 5.0/5.1's log bonus kept apart
    max_abs, rel_l2, _, top1 = compare(references[variant], model.forward(TOKENS, full_output=True)[0])
    tol = TOLERANCES["fp16"]  # the layout is F16
    assert max_abs <= tol.max_abs and rel_l2 <= tol.rel_l2 and top1 >= tol.top1


def test_foreign_web_rwkv_file_without_our_metadata_reads_back(fixture_dir, tmp_path, references):
    """An RWKV-Runner file carries only {"format": "pt"}: the layout is told from the tensors."""
    for variant in ("v5.2", "v6", "v7"):
        (ours,) = rwkv_convert.convert(fixture_path(variant, directory=fixture_dir), "safetensors", tmp_path / "o.st",
                                       layout="web-rwkv")
        from rwkv_convert.formats.safetensors_io import read_safetensors

        tensors, _ = read_safetensors(ours)
        save_file({k: v.clone() for k, v in tensors.items()}, tmp_path / "foreign.st", metadata={"format": "pt"})
        got = rwkv_convert.load(tmp_path / "foreign.st").forward(TOKENS, full_output=True)[0]
        assert compare(references[variant], got)[0] <= TOLERANCES["fp16"].max_abs, variant


@pytest.mark.slow
def test_web_rwkv_refuses_other_dtypes_and_converts_onward(fixture_dir, tmp_path, references):
    src = fixture_path("v7", directory=fixture_dir)
    assert_one_line_error(cli("convert", src, "--to", "safetensors", "--layout", "web-rwkv", "--dtype", "bf16",
                              "-o", tmp_path / "m.st"), "only F16")
    assert list(tmp_path.iterdir()) == []
    proc = cli("convert", src, "--to", "safetensors", "--layout", "web-rwkv", "-o", tmp_path / "m.st", "--verify")
    assert proc.returncode == 0 and "tolerance  fp16" in proc.stdout, proc.stdout + proc.stderr  # F16 file
    st = tmp_path / "m.st"

    (gguf,) = rwkv_convert.convert(st, "gguf", tmp_path / "m.gguf", quant="f32")  # .st -> GGUF
    got = rwkv_convert.load(gguf).forward(TOKENS, full_output=True)[0]
    assert compare(references["v7"], got)[0] <= TOLERANCES["fp16"].max_abs


def test_blinkdl_keyed_safetensors_equals_the_pth(fixture_dir, tmp_path, references):
    for variant in ("v4", "v5.2-state", "v6", "v7"):
        sd = torch.load(fixture_path(variant, directory=fixture_dir), weights_only=True)
        save_file(sd, tmp_path / f"{variant}.safetensors", metadata={"format": "pt"})
        got = rwkv_convert.load(tmp_path / f"{variant}.safetensors").forward(TOKENS, full_output=True)[0]
        assert torch.equal(got, references[variant]), variant


# ---- Hugging Face ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hf_v4_runs_in_transformers(fixture_dir, tmp_path, references, neox_tokenizer):
    transformers = pytest.importorskip("transformers")
    src = fixture_path("v4", directory=fixture_dir)
    out = tmp_path / "hf4"
    # a small shard size forces shards and an index
    rwkv_convert.convert(src, "safetensors", out, layout="hf", dtype="fp32", shard_size=2_000_000,
                         tokenizer=neox_tokenizer)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    model, info = transformers.RwkvForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    model.eval()
    ref = references["v4"]
    with torch.no_grad():
        full = model(torch.tensor([TOKENS])).logits[0]
        first = model(torch.tensor([TOKENS[:SPLIT]]), use_cache=True)
        second = model(torch.tensor([TOKENS[SPLIT:]]), state=first.state, use_cache=True)
    assert (full - ref).abs().max().item() <= TOLERANCES["fp32"].max_abs
    carried = torch.cat([first.logits[0], second.logits[0]])
    assert (carried - ref).abs().max().item() <= TOLERANCES["fp32"].max_abs
    assert torch.equal(rwkv_convert.load(out).forward(TOKENS, full_output=True)[0], ref)  # our reader


@pytest.mark.parametrize("variant", ["v7", "v7-layer0-v"])
@pytest.mark.slow
def test_hf_v7_runs_in_rwkv7_hf(variant, fixture_dir, tmp_path, references):
    rwkv7_hf = pytest.importorskip("rwkv7_hf")
    src = fixture_path(variant, directory=fixture_dir)
    out = tmp_path / "hf7"
    proc = cli("convert", src, "--to", "safetensors", "--layout", "hf", "--dtype", "fp32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    model, info = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    model.eval()
    ref = references[variant]
    with torch.no_grad():
        full = model(torch.tensor([TOKENS])).logits[0]
        first = model(torch.tensor([TOKENS[:SPLIT]]), use_cache=True)
        second = model(torch.tensor([TOKENS[SPLIT:]]), past_key_values=first.past_key_values, use_cache=True)
    assert (full - ref).abs().max().item() <= TOLERANCES["fp32"].max_abs
    carried = torch.cat([first.logits[0], second.logits[0]])
    assert (carried - ref).abs().max().item() <= TOLERANCES["fp32"].max_abs
    assert torch.equal(rwkv_convert.load(out).forward(TOKENS, full_output=True)[0], ref)


@pytest.mark.slow
def test_hf_v7_tokenizer_matches_the_pip_package(tmp_path):
    rwkv7_hf = pytest.importorskip("rwkv7_hf")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_convert.tokenizer import world_vocab_path

    src = save_atomic(make_state_dict("v7", n_layer=1, n_embd=64, vocab=65536), tmp_path / "full.pth")
    rwkv_convert.convert(src, "safetensors", tmp_path / "hf", layout="hf")
    tok = rwkv7_hf.RWKV7Tokenizer.from_pretrained(tmp_path / "hf")
    pip = TRIE_TOKENIZER(str(world_vocab_path()))
    for text in ["Hello world!", "User: 你好，世界。\n\nAssistant: 🙂 ñ", "   spaces  \t tabs"]:
        assert tok.encode(text, add_special_tokens=False) == pip.encode(text)


@pytest.mark.parametrize("variant", ["v5.2", "v6"])
def test_hf_v5_2_and_v6_read_back_as_the_model_they_hold(variant, fixture_dir, tmp_path, references):
    """Rwkv6ForCausalLM directories (llama.cpp's converter reads them: test_gguf): v6 as it is, 5.2 as v6 with
    zero LoRAs, which computes the same."""
    out = tmp_path / "hf"
    rwkv_convert.convert(fixture_path(variant, directory=fixture_dir), "safetensors", out, layout="hf", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["Rwkv6ForCausalLM"], "rwkv6")
    got = rwkv_convert.load(out).forward(TOKENS, full_output=True)[0]
    assert (got - references[variant]).abs().max().item() <= (0 if variant == "v6" else 1e-4)


def test_hf_v6_with_ranks_llama_cpps_converter_does_not_expect_gets_a_note(tmp_path):
    src = save_atomic(make_state_dict("v6", n_layer=1, n_embd=128, vocab=257, ranks={"maa": 16, "decay": 40}),
                      tmp_path / "v6.pth")
    proc = cli("convert", src, "--to", "safetensors", "--layout", "hf", "-o", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "note: this model's LoRA ranks are 16/40; llama.cpp's convert_hf_to_gguf.py assumes 32/64" in proc.stderr


AUTO_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    logits = model(torch.tensor([json.loads(sys.argv[2])])).logits[0]
chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"model": type(model).__name__, "tokenizer": type(tok).__name__, "logits": logits.tolist(),
                  "ids": tok("User: hello world\\n\\nAssistant:").input_ids, "chat": chat}))
"""


def auto_load(directory, tokens) -> dict:
    """The directory loaded the way Hugging Face users load it, in a fresh process (nothing registered by us)."""
    proc = subprocess.run([sys.executable, "-c", AUTO_LOAD, str(directory), json.dumps(tokens)], capture_output=True,
                          text=True, timeout=600, cwd=directory.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_hf_v7_loads_through_the_auto_classes_like_rwkv7_hf_s_own_conversion(tmp_path):
    """AutoModelForCausalLM and AutoTokenizer with trust_remote_code, as for a directory of rwkv7-hf's own
    converter: the same files and settings (listed differences aside), logits within 1e-4 of our runner."""
    pytest.importorskip("rwkv7_hf")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_convert.tokenizer import world_vocab_path

    src = save_atomic(make_state_dict("v7", n_layer=2, n_embd=128, vocab=65536), tmp_path / "v7.pth")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert cli("convert", src, "--to", "safetensors", "--layout", "hf", "--dtype", "fp32", "-o", ours).returncode == 0
    converter = shutil.which("rwkv7-hf-convert")
    subprocess.run([converter, "--input", src, "--output", theirs, "--precision", "fp32", "--vocab-file",
                    world_vocab_path()], check=True, capture_output=True, timeout=600)
    # the same files, but for the licence of the model code we copy
    assert {p.name for p in ours.iterdir()} - {"LICENSE.rwkv7-hf"} == {p.name for p in theirs.iterdir()}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    deliberate = {"rwkv_convert_source", "transformers_version"}  # ours names its source; theirs its writer
    for name in ("config.json", "generation_config.json"):
        mine, other = json.loads((ours / name).read_text()), json.loads((theirs / name).read_text())
        assert {k: v for k, v in mine.items() if k not in deliberate} == \
            {k: v for k, v in other.items() if k not in deliberate}, name
    tokens = tokens_for(65536)[:24]
    want = rwkv_convert.load(src).forward(tokens, full_output=True)[0]
    got, reference = auto_load(ours, tokens), auto_load(theirs, tokens)
    assert (got["model"], got["tokenizer"]) == ("RWKV7ForCausalLM", "RWKV7Tokenizer")
    assert (torch.tensor(got["logits"]) - want).abs().max().item() <= 1e-4
    assert got["ids"] == reference["ids"] == TRIE_TOKENIZER(str(world_vocab_path())).encode(
        "User: hello world\n\nAssistant:")
    assert got["chat"] == reference["chat"] == "User: hi\nAssistant:"


TOKENIZE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps({"ids": [tok(t).input_ids for t in texts], "decoded": [tok.decode(tok(t).input_ids) for t in texts],
                  "special": [tok.bos_token, tok.eos_token, tok.pad_token]}))
"""


@pytest.mark.slow
def test_hf_v4_ships_the_given_tokenizer_and_refuses_a_wrong_one(tmp_path, neox_tokenizer):
    """AutoTokenizer on a v4 directory encodes exactly as the tokenizers library does on the tokenizer.json it
    was given (the Pile models' GPT-NeoX BPE); a tokenizer with more ids than the model, or none for a model
    that is not World-sized, is refused before anything is written."""
    from tokenizers import Tokenizer

    src = save_atomic(make_state_dict("v4", n_layer=1, n_embd=64, vocab=448), tmp_path / "v4.pth")
    out = tmp_path / "hf"
    assert cli("convert", src, "--to", "safetensors", "--layout", "hf", "--tokenizer", neox_tokenizer,
               "-o", out).returncode == 0
    texts = ["hello world", "The quick brown fox", "ünïcödé café 你好 🙂", "tabs\t and  spaces 3.14",
             "<|endoftext|>between<|padding|>"]
    proc = subprocess.run([sys.executable, "-c", TOKENIZE, str(out), json.dumps(texts)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    library = Tokenizer.from_file(str(neox_tokenizer))
    assert got["ids"] == [library.encode(t).ids for t in texts]
    assert all(got["ids"][:4]), "an encoding came back empty"
    assert got["decoded"][:4] == [library.decode(library.encode(t).ids) for t in texts[:4]]
    assert got["special"] == ["<|endoftext|>", "<|endoftext|>", "<|padding|>"]
    # a model with fewer ids than the tokenizer makes
    small = save_atomic(make_state_dict("v4", n_layer=1, n_embd=64, vocab=300), tmp_path / "small.pth")
    assert_one_line_error(cli("convert", small, "--to", "safetensors", "--layout", "hf", "--tokenizer",
                              neox_tokenizer, "-o", tmp_path / "small"),
                          r"has \d+ token ids but the model's vocabulary has 300")
    # a Pile-shaped model without its tokenizer: not the World vocabulary
    pile = save_atomic(make_state_dict("v4", n_layer=1, n_embd=32, vocab=50277), tmp_path / "pile.pth")
    assert_one_line_error(cli("convert", pile, "--to", "safetensors", "--layout", "hf", "-o", tmp_path / "pile"),
                          "50277 token ids, not the World vocabulary's 65536: pass the tokenizer")
    assert not (tmp_path / "small").exists() and not (tmp_path / "pile").exists()


@pytest.mark.slow
def test_hf_v4_world_model_gets_the_world_tokenizer(tmp_path):
    """A 65536-id RWKV-4 World model without --tokenizer: the World vocabulary through AutoTokenizer
    (rwkv7-hf's tokenizer code beside it), encoding as the pip package does."""
    pytest.importorskip("rwkv7_hf")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_convert.tokenizer import world_vocab_path

    src = save_atomic(make_state_dict("v4", n_layer=1, n_embd=32, vocab=65536), tmp_path / "world.pth")
    out = tmp_path / "hf"
    assert cli("convert", src, "--to", "safetensors", "--layout", "hf", "-o", out).returncode == 0
    texts = ["hello world", "User: 你好\n\nAssistant: 🙂"]
    script = TOKENIZE.replace("(sys.argv[1])", "(sys.argv[1], trust_remote_code=True)")
    proc = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(texts)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pip = TRIE_TOKENIZER(str(world_vocab_path()))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ids"] == [pip.encode(t) for t in texts]


@pytest.mark.parametrize("variant", ["v5.0", "v5.1", "v5.2-state", "v7-deepembed"])
@pytest.mark.slow
def test_hf_refuses_what_no_layout_holds(variant, fixture_dir, tmp_path):
    proc = cli("convert", fixture_path(variant, directory=fixture_dir), "--to", "safetensors", "--layout", "hf",
               "-o", tmp_path / "out")
    assert_one_line_error(proc, "no Hugging Face layout|DeepEmbed")
    assert list(tmp_path.iterdir()) == []


# ---- prepared ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp16", "cpu fp32i8 *3 -> cpu bf16"])
def test_prepared_equals_the_in_memory_conversion_bit_for_bit(variant, strategy, fixture_dir, tmp_path):
    src = fixture_path(variant, directory=fixture_dir)
    (out,) = rwkv_convert.convert(src, "safetensors", tmp_path / "m.safetensors", layout="prepared",
                                   strategy=strategy)
    prepared, direct = rwkv_convert.load(out), rwkv_convert.load(src, strategy)
    assert str(prepared.strategy) == str(direct.strategy) and prepared.passes == direct.passes
    for tokens in (TOKENS, TOKENS[:1]):
        a, state_a = prepared.forward(tokens, full_output=True)
        b, state_b = direct.forward(tokens, full_output=True)
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(state_a, state_b, strict=True))


@pytest.mark.slow
def test_prepared_records_its_plan_and_refuses_another(fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    (out,) = rwkv_convert.convert(src, "safetensors", tmp_path / "m.safetensors", layout="prepared",
                                   strategy="cpu fp32i8")
    _, meta, _ = read_header(out)
    assert meta["rwkv_convert.strategy"] == "cpu fp32i8" and len(meta["rwkv_convert.source_sha256"]) == 64
    assert "precompute-decay" in json.loads(meta["rwkv_convert.passes"])
    with pytest.raises(RwkvConvertError, match='prepared for "cpu fp32i8", not "cpu fp32"'):
        rwkv_convert.load(out, "cpu fp32")
    assert_one_line_error(cli("verify", out, "--reference", src, "--strategy", "cpu bf16"), "prepared for")
    proc = cli("verify", out, "--reference", src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with pytest.raises(RwkvConvertError, match="not an original checkpoint"):
        rwkv_convert.read_checkpoint(out)


# ---- malformed files ---------------------------------------------------------------------------------
def _file(tmp_path, name: str, header: bytes | dict, data: bytes = b"", declared: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(body) if declared is None else declared) + body + data)
    return path


@pytest.mark.parametrize("case,pattern", [
    ("truncated", "truncated"), ("not-json", "corrupt safetensors header"), ("huge", "declares a"),
    ("overlap", "overlap"), ("out-of-range", "ends at byte"), ("wrong-size", "needs 16 bytes"),
    ("huge-empty-shape", "is malformed"),
])
@pytest.mark.slow
def test_malformed_safetensors_get_one_line(case, pattern, fixture_dir, tmp_path):
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    if case == "truncated":
        (out,) = rwkv_convert.convert(fixture_path("v4", directory=fixture_dir), "safetensors", tmp_path / "ok.st",
                                       layout="web-rwkv")
        path = tmp_path / "bad.st"
        path.write_bytes(out.read_bytes()[:-1000])
    elif case == "not-json":
        path = _file(tmp_path, "bad.st", b"{not json at all}")
    elif case == "huge":
        path = _file(tmp_path, "bad.st", {"a": entry}, bytes(16), declared=2 ** 40)
    elif case == "overlap":
        path = _file(tmp_path, "bad.st", {"a": entry, "b": {**entry, "data_offsets": [8, 24]}}, bytes(32))
    elif case == "huge-empty-shape":  # 0 bytes, but no tensor can have a dimension of 10**20
        path = _file(tmp_path, "bad.st", {"a": {**entry, "shape": [10 ** 20, 0], "data_offsets": [0, 0]}}, b"")
    elif case == "out-of-range":
        path = _file(tmp_path, "bad.st", {"a": {**entry, "data_offsets": [16, 32]}}, bytes(16))
    else:
        path = _file(tmp_path, "bad.st", {"a": {**entry, "data_offsets": [0, 12]}}, bytes(16))
    assert_one_line_error(cli("inspect", path), pattern)
    with pytest.raises(RwkvConvertError, match=pattern):
        rwkv_convert.load(path)


def test_safetensors_writer_leaves_no_file_on_failure(fixture_dir, tmp_path, neox_tokenizer):
    with pytest.raises(UnsupportedError):
        rwkv_convert.convert(fixture_path("v5.1", directory=fixture_dir), "safetensors", tmp_path / "out", layout="hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(RwkvConvertError, match="not an empty directory"):
        rwkv_convert.convert(fixture_path("v4", directory=fixture_dir), "safetensors", tmp_path / "busy", layout="hf",
                             tokenizer=neox_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
