"""RWKV-7 DeepEmbed ("7a") and DEA ("7b"): the runner against the pip package (7a, RWKV_DE_VERSION=1) and against
a float64 implementation written from the reference page (tests/float64_v7.py), in sequence, token-by-token and
20 + 44 modes; DEA's growing state by its properties."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_convert
from rwkv_convert.fixtures import fixture_path, make_state_dict
from rwkv_convert.runner import Model
from rwkv_convert.runtimes.pip_package import run_in_pip_package
from rwkv_convert.verify import run_ours, verify

from .conftest import SPLIT, save_atomic, tokens_for
from .float64_v7 import logits_float64
from .test_cli import cli
from .test_reference_runner import FP32_BOUND, assert_matches

# (variant, file dtype, make_state_dict arguments): head sizes 64 and 32, odd widths and vocabularies
SHAPES = {
    "7a-fp32": ("v7-deepembed", "fp32", {}),
    "7a-bf16": ("v7-deepembed", "bf16", {}),
    "7a-C160-N32-V1000-L3": ("v7-deepembed", "fp32", dict(n_layer=3, n_embd=160, vocab=1000, head_size=32)),
    "7b-fp32": ("v7-dea", "fp32", {}),
    "7b-bf16": ("v7-dea", "bf16", {}),
    "7b-C96-N32-V700-L2": ("v7-dea", "fp32", dict(n_layer=2, n_embd=96, vocab=700, head_size=32)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOAT64_RELATIVE = 1e-5  # fp32 against float64: measured 1e-6 to 2e-6 of the largest logit


@pytest.fixture(scope="module")
def variant_files(fixture_dir) -> dict[str, tuple[Path, int]]:
    files = {}
    for name, (variant, dtype, kw) in SHAPES.items():
        sd = make_state_dict(variant, **kw)
        path = save_atomic({k: v.to(DTYPES[dtype]) for k, v in sd.items()}, fixture_dir / f"variant-{name}.pth")
        files[name] = (path, kw.get("vocab", 512))
    return files


@pytest.fixture(scope="module")
def deep_embed_oracle(variant_files) -> dict[str, dict]:
    names = [n for n in SHAPES if n.startswith("7a")]
    jobs = [{"path": str(variant_files[n][0]), "strategy": "cpu fp32", "tokens": tokens_for(variant_files[n][1]),
             "split": SPLIT} for n in names]
    return dict(zip(names, run_in_pip_package(jobs, deep_embed=True), strict=True))


@pytest.mark.parametrize("name", [n for n in SHAPES if n.startswith("7a")])
def test_deep_embed_matches_pip_package(name, variant_files, deep_embed_oracle):
    path, vocab = variant_files[name]
    ref = deep_embed_oracle[name]
    assert "error" not in ref, ref
    assert_matches(run_ours(rwkv_convert.load(path), tokens_for(vocab), SPLIT), ref, FP32_BOUND)


@pytest.mark.parametrize("name", list(SHAPES))
def test_variants_match_float64_reference(name, variant_files):
    path, vocab = variant_files[name]
    tokens = tokens_for(vocab)
    ref = logits_float64(torch.load(path, weights_only=True), tokens)
    ours = run_ours(rwkv_convert.load(path), tokens, SPLIT)
    for mode in ("seq", "one", "split"):
        relative = ((ours[mode].double() - ref).abs().max() / ref.abs().max()).item()
        assert relative <= FLOAT64_RELATIVE, f"{mode}: {relative:.2e} of the largest logit"


@pytest.mark.parametrize("name", ["7b-fp32", "7b-C96-N32-V700-L2"])
def test_dea_state_carries_the_context(name, variant_files):
    path, vocab = variant_files[name]
    model = rwkv_convert.load(path)
    tokens = tokens_for(vocab)
    ours = run_ours(model, tokens, SPLIT)
    for mode in ("one", "split"):  # sequence == token by token == 20 + 44, states included
        assert (ours[mode] - ours["seq"]).abs().max().item() <= FP32_BOUND
        for a, b in zip(ours[mode + "_state"], ours["seq_state"], strict=True):
            assert a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= FP32_BOUND
    state = ours["seq_state"]
    assert state[-1].tolist() == tokens  # the context's token ids
    per_layer, cache = model.state_per_layer, model.spec.variant_dims["dea_cache"]
    assert model.state_names[3:6] == ["dea_k_cache.0", "dea_v_cache.0", "dea_q.0"]
    assert state[3].shape == (len(tokens), cache) and state[per_layer + 4].shape == (len(tokens), cache)


def test_dea_is_causal(variant_files):
    path, vocab = variant_files["7b-fp32"]
    model = rwkv_convert.load(path)
    tokens = tokens_for(vocab)
    changed = tokens[:40] + [(tokens[40] + 1) % vocab] + tokens[41:]
    a, _ = model.forward(tokens, full_output=True)
    b, _ = model.forward(changed, full_output=True)
    assert torch.equal(a[:40], b[:40])  # no earlier position sees a later token
    assert (a[40] - b[40]).abs().max().item() > 1e-3


def test_dea_state_is_checked(variant_files):
    path, vocab = variant_files["7b-fp32"]
    model = rwkv_convert.load(path)
    _, state = model.forward(tokens_for(vocab)[:10])
    state = list(state)
    state[3] = state[3][:5]  # a cache that does not match the context's ids
    expected = r"state\[3\] \(dea_k_cache of layer 0\) has shape \(5, 32\), expected \(10, 32\)"
    with pytest.raises(rwkv_convert.RwkvConvertError, match=expected):
        model.forward([1], state)


def test_dea_long_context_memory_is_linear(fixture_dir):
    """4096 tokens in one call and in chunks: the state grows by the same bytes per token; the scores are
    computed a block of queries at a time, so peak memory does not hold T x n scores."""
    path = fixture_path("v7-dea", n_layer=2, directory=fixture_dir)
    model = rwkv_convert.load(path)
    tokens = torch.randint(0, 512, (4096,), generator=torch.Generator().manual_seed(5)).tolist()
    sizes = {}
    state = None
    for end in (1024, 2048, 4096):
        _, state = model.forward(tokens[end - (1024 if end == 1024 else end // 2):end], state)
        sizes[end] = Model.state_bytes(state)
    per_token = (sizes[4096] - sizes[2048]) / 2048
    assert per_token == (sizes[2048] - sizes[1024]) / 1024 == 2 * 2 * 32 * 4 + 8  # two fp32 caches per layer, an id
    whole, whole_state = model.forward(tokens)
    chunked, _ = model.forward(tokens[2048:], model.forward(tokens[:2048])[1])
    assert (whole - chunked).abs().max().item() <= FP32_BOUND
    assert Model.state_bytes(whole_state) == sizes[4096]


PEAK_RSS = """
import sys, torch, rwkv_convert
def peak():  # this process's high-water mark (VmHWM starts afresh at exec, unlike ru_maxrss)
    return int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) * 1024
base = peak()
model = rwkv_convert.load(sys.argv[1])
state = None
for t in range(0, 200, 50):
    _, state = model.forward(list(range(t, t + 50)), state)
print(peak() - base)
"""


CONVERT_PEAK_RSS = """
import sys, rwkv_convert
def peak():
    return int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) * 1024
base = peak()
rwkv_convert.convert(sys.argv[1], sys.argv[2], sys.argv[3])
print(peak() - base)
"""


@pytest.fixture(scope="module")
def large_vocab_deep_embed(tmp_path_factory) -> tuple[Path, int, int]:
    """A bf16 DeepEmbed file with V=65536, whose tables are 4x the rest of the model: (path, its dense part
    in fp32 bytes, its largest table in the file's bytes)."""
    sd = make_state_dict("v7-deepembed", n_layer=2, n_embd=128, vocab=65536)
    path = save_atomic({k: v.to(torch.bfloat16) for k, v in sd.items()},
                       tmp_path_factory.mktemp("de") / "de-V65536.pth")
    dense = sum(v.numel() * 4 for k, v in sd.items() if "s_emb.weight" not in k)
    return path, dense, 65536 * 1024 * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_deep_embed_tables_stay_in_the_file_when_running(large_vocab_deep_embed):
    path, dense, table = large_vocab_deep_embed
    model = rwkv_convert.load(path)
    assert model.spec.table_params == 2 * 65536 * 1024
    assert model.layers[0]["ffn.s_emb.weight"].dtype == torch.bfloat16  # as stored, never converted
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
    peak = int(proc.stdout.split()[-1])
    assert peak < 2 * dense + table, json.dumps({"peak": peak, "dense": dense, "table": table})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("to, name", [("onnx", "de.onnx"), ("prepared", "de.st")])
def test_converting_deep_embed_keeps_memory_near_the_dense_model(to, name, large_vocab_deep_embed, tmp_path):
    """Peak RSS below 2x the dense part plus the largest single table: tables are written in row blocks."""
    path, dense, table = large_vocab_deep_embed
    proc = subprocess.run([sys.executable, "-c", CONVERT_PEAK_RSS, str(path), to, str(tmp_path / name)],
                          capture_output=True, text=True, check=True)
    peak = int(proc.stdout.split()[-1])
    assert peak < 2 * dense + table, json.dumps({"peak": peak, "dense": dense, "table": table})


@pytest.mark.parametrize("name", ["7a-fp32", "7b-fp32"])
def test_int8_strategies_and_calibration_on_the_dense_matrices(name, variant_files, tmp_path):
    """Mixed and int8 strategies (GPTQ-calibrated included) quantize the dense matrices; tables stay as stored."""
    path, _ = variant_files[name]
    out = tmp_path / "int8.st"
    rwkv_convert.convert(path, "safetensors", out, layout="prepared", strategy="cpu fp32 *2 -> cpu fp32i8",
                         calibration="bundled")
    report = verify(out, path, tokens=32)
    assert report.passed, report.worst
    model = rwkv_convert.load(out)
    assert type(model.layers[3]["ffn.key.weight"]).__name__ in ("RwkvInt8Weight", "RwkvInt8Rows")  # file, CPU form
    assert model.layers[3]["ffn.s_emb.weight"].dtype == torch.float32  # as the file stored it
    plan = cli("plan", path, "--strategy", "cpu fp32i8")
    assert "per-token tables" in plan.stdout and "stay memory-mapped" in plan.stdout
