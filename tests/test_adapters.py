"""Fine-tuning adapters (LoRA, PiSSA, Bone, DiSHA) merged on read with --lora, and --to pth: the merged file runs
in the rwkv pip package as the published formulas (written again here, block by block, independently of
rwkv_convert/adapters.py) say; the GGUF of a merged model passes verify in llama.cpp against the same merge;
refusals are one line with nothing written; --to pth round trips."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import rwkv_convert
from rwkv_convert.adapters import AdapterRef
from rwkv_convert.fixtures import fixture_path
from rwkv_convert.runtimes.pip_package import run_in_pip_package
from rwkv_convert.verify import verify

from .conftest import save_atomic, tokens_for
from .test_cli import assert_one_line_error, cli

TARGETS = {"v4": ("att.key", "att.value", "att.receptance", "ffn.key", "ffn.value"),
           "v6": ("att.key", "att.value", "att.output", "ffn.key", "ffn.receptance"),
           "v7": ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _targets(sd: dict, version: str) -> list[str]:
    return [k for k in sd if k.endswith(".weight") and k.startswith("blocks.")
            and k.removesuffix(".weight").split(".", 2)[-1] in TARGETS[version]]


def make_adapter(sd: dict, version: str, kind: str, seed: int = 0):
    """(adapter tensors, init tensors or None) of `kind`, at sizes that move the model visibly."""
    g, adapter, init = _gen(seed), {}, {}
    for name in _targets(sd, version):
        w, prefix = sd[name], name.removesuffix(".weight")
        out, inp = w.shape
        if kind == "lora":
            adapter[f"{prefix}.lora_A"] = torch.randn(8, inp, generator=g) * 0.1
            adapter[f"{prefix}.lora_B"] = torch.randn(out, 8, generator=g) * 0.1
        elif kind == "pissa":  # the init is W's top singular part, training moves it a little
            u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
            b0, a0 = u[:, :8] * s[:8].sqrt(), s[:8].sqrt()[:, None] * vh[:8]
            init[f"{prefix}.init_lora_A"], init[f"{prefix}.init_lora_B"] = a0, b0
            adapter[f"{prefix}.lora_A"] = a0 + torch.randn(a0.shape, generator=g) * 0.05
            adapter[f"{prefix}.lora_B"] = b0 + torch.randn(b0.shape, generator=g) * 0.05
        elif kind in ("bone", "disha3"):
            r = 16
            adapter[f"{prefix}.{kind[:5]}"] = torch.randn(inp // r, r, r, generator=g) * 0.05
        elif kind == "disha2":  # r = 24 does not divide 128 or 512: the tail columns are used too
            adapter[f"{prefix}.disha"] = torch.randn(24, out, generator=g) * 0.05
    first = "blocks.1.ln2.weight"
    adapter[first] = sd[first] * 1.25  # a whole trained tensor replaces the base's
    return adapter, (init or None)


def published_merge(sd: dict, adapter: dict, kind: str, alpha: float | None = None, init: dict | None = None,
                    scale: float = 1.0) -> dict:
    """RWKV-PEFT's formulas, block by block (fp32)."""
    out = {k: v.clone().float() for k, v in sd.items()}
    for name in list(out):
        prefix = name.removesuffix(".weight")
        w = out[name]
        if f"{prefix}.lora_A" in adapter:
            a, b = adapter[f"{prefix}.lora_A"], adapter[f"{prefix}.lora_B"]
            if kind == "pissa":
                delta = b @ a - init[f"{prefix}.init_lora_B"] @ init[f"{prefix}.init_lora_A"]
            else:
                delta = alpha / a.shape[0] * (b @ a)
            out[name] = w + scale * delta
        for part in ("bone", "disha"):
            t = adapter.get(f"{prefix}.{part}")
            if t is None:
                continue
            delta = torch.zeros_like(w)
            if t.dim() == 3:
                r = t.shape[-1]
                for i in range(w.shape[0] // r):
                    for j in range(w.shape[1] // r):
                        block = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
                        delta[i * r:(i + 1) * r, j * r:(j + 1) * r] = block @ t[j] + t[j]
            else:
                for col in range(w.shape[1]):  # column k*r + j (and tail column whole + j) gains disha[j]
                    delta[:, col] = t[col % t.shape[0]]
            out[name] = w + scale * delta
    for name, t in adapter.items():
        if not name.endswith((".lora_A", ".lora_B", ".bone", ".disha")):
            out[name] = out[name] + scale * (t.float() - out[name])
    return out


CASES = [("v4", "lora"), ("v6", "lora"), ("v7", "lora"), ("v7", "pissa"), ("v6", "bone"), ("v7", "bone"),
         ("v7", "disha3"), ("v7", "disha2")]


@pytest.fixture(scope="module")
def adapters(fixture_dir, tmp_path_factory):
    """Per case: (base, AdapterRef, the independently merged checkpoint)."""
    out, made = tmp_path_factory.mktemp("adapters"), {}
    for version, kind in CASES:
        base = fixture_path(version, directory=fixture_dir)
        sd = torch.load(base, weights_only=True)
        adapter, init = make_adapter(sd, version, kind, seed=len(made))
        path = save_atomic(adapter, out / f"{version}-{kind}.pth")
        init_path = save_atomic(init, out / f"{version}-{kind}-init.pth") if init else None
        alpha = 16.0 if kind == "lora" else None
        merged = save_atomic(published_merge(sd, adapter, kind, alpha, init), out / f"{version}-{kind}-merged.pth")
        made[version, kind] = (base, AdapterRef(path, alpha, init_path), merged)
    return made


def _pip_logits(paths: list, v7: bool, tokens: list[int]) -> list[torch.Tensor]:
    jobs = [{"kind": "quick", "path": str(p), "strategy": "cpu fp32", "tokens": tokens, "split": 4} for p in paths]
    return [out["seq"] for out in run_in_pip_package(jobs, v7=v7)]


@pytest.mark.parametrize("v7", [False, True], ids=["v4-v6", "v7"])
def test_merged_pth_runs_in_the_pip_package_as_the_published_formula(v7, adapters, tmp_path):
    cases = [c for c in CASES if (c[0] == "v7") == v7]
    tokens = tokens_for(512)[:24]
    paths = []
    for version, kind in cases:
        base, ref, merged = adapters[version, kind]
        ours = rwkv_convert.convert(base, "pth", tmp_path / f"{version}-{kind}.pth", adapters=[ref])[0]
        paths += [ours, merged, base]
    logits = _pip_logits(paths, v7, tokens)
    for n, case in enumerate(cases):
        ours, published, base = logits[3 * n:3 * n + 3]
        assert (ours - published).abs().max().item() < 1e-4, case
        assert (ours - base).abs().max().item() > 0.05, case  # the adapter changes what the model says


LLAMA = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not LLAMA and not os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA"), reason="needs llama-cpp-python")
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "v4"], ids="-".join)
def test_gguf_of_a_merged_model_verifies_in_llama_cpp(case, adapters, tmp_path):
    base, ref, _ = adapters[case]
    out = rwkv_convert.convert(base, "gguf", tmp_path / "ft.gguf", adapters=[ref])[0]
    report = verify(out, base, tokens=16, adapters=[ref])
    assert report.passed, report.worst
    assert report.runner.startswith("llama.cpp"), report.runner
    assert f"adapter {ref.path.name}" in report.reference and report.adapters[0]["sha256"][:12] in report.reference
    assert not verify(out, base, tokens=16).passed  # the same file against the base alone fails


def test_stacked_adapters_merge_in_order_and_scale_is_a_fraction(adapters, tmp_path):
    base, lora, _ = adapters["v7", "lora"]
    _, bone, _ = adapters["v7", "bone"]
    sd = torch.load(base, weights_only=True)
    la, bo = torch.load(lora.path, weights_only=True), torch.load(bone.path, weights_only=True)
    expected = published_merge(published_merge(sd, la, "lora", 16.0, scale=0.5), bo, "bone")
    got = rwkv_convert.read_checkpoint(base, adapters=[AdapterRef(lora.path, 16.0, scale=0.5), bone])
    for name, t in expected.items():
        assert torch.allclose(got.tensors[name].float(), t, atol=1e-5), name
    assert [a.kind for a in got.applied_adapters] == ["lora", "bone"]


def test_cli_merges_with_per_adapter_options(adapters, tmp_path):
    base, lora, _ = adapters["v7", "lora"]
    _, pissa, merged_pissa = adapters["v7", "pissa"]
    out = tmp_path / "stack.pth"
    proc = cli("convert", base, "--lora", pissa.path, "--lora", lora.path, "--lora-init", pissa.init, "--lora-init",
               "none", "--lora-alpha", "none", "--lora-alpha", "16", "--to", "pth", "-o", out)
    assert proc.returncode == 0, proc.stderr
    expected = published_merge(torch.load(merged_pissa, weights_only=True), torch.load(lora.path, weights_only=True),
                               "lora", 16.0)
    written = torch.load(out, weights_only=True)
    assert max((written[k] - expected[k]).abs().max().item() for k in expected) < 1e-5


def test_inspect_describes_an_adapter_alone_and_a_merged_model(adapters):
    base, ref, _ = adapters["v6", "bone"]
    info = json.loads(cli("inspect", ref.path, "--json").stdout)
    assert (info["adapter"], info["rank"]) == ("bone", 16)
    assert len(info["targets"]) == 7 * len(TARGETS["v6"]) and info["replaced"] == ["blocks.1.ln2.weight"]
    assert info["fits"]["layers"] == "a model of at least 7 layers"
    assert info["fits"]["shapes"]["blocks.0.att.key.weight"] == "[a multiple of 16, 128]"
    merged = json.loads(cli("inspect", base, "--lora", ref.path, "--json").stdout)
    assert merged["adapters"][0]["kind"] == "bone" and merged["n_layer"] == 7


def _refused(tmp_path, *args, pattern):
    out = tmp_path / "out.gguf"
    assert_one_line_error(cli("convert", *args, "--to", "gguf", "-o", out), pattern)
    assert not out.exists()


def test_refusals_name_the_problem_and_write_nothing(adapters, fixture_dir, tmp_path):
    base6, lora6, _ = adapters["v6", "lora"]
    base7, pissa, _ = adapters["v7", "pissa"]
    _, bone7, _ = adapters["v7", "bone"]
    work = tmp_path / "work"
    work.mkdir()
    _refused(work, base6, "--lora", lora6.path, pattern=r"is a LoRA \(rank 8\): give --lora-alpha")
    _refused(work, base7, "--lora", pissa.path, "--lora-alpha", "16",
             pattern=r"looks like a PiSSA adapter .*cosine .*--lora-init")
    _refused(work, base7, "--lora", pissa.path, "--lora-init", pissa.init, "--lora-alpha", "16",
             pattern="--lora-alpha does not apply to a PiSSA adapter")
    _refused(work, base7, "--lora", pissa.init, pattern="PiSSA init tensor: this is the init file")
    _refused(work, base7, "--lora", bone7.path, "--lora-alpha", "8", pattern="bone adapter, which has no alpha")
    _refused(work, base7, "--lora", lora6.path, "--lora-alpha", "16",
             pattern=r"v6-lora\.pth: blocks\.0\.\w+\.\w+\.lora_A: .*the adapter is for another model")
    _refused(work, base7, "--lora", lora6.path, "--lora", bone7.path, "--lora-alpha", "1", "--lora-alpha", "2",
             "--lora-alpha", "3", pattern="--lora-alpha is given 3 times for 2 --lora")
    _refused(work, base7, "--lora-alpha", "16", pattern="--lora-alpha applies to an adapter")
    # a name the base lacks, a shape that does not fit, a mismatched init
    sd = torch.load(base7, weights_only=True)
    extra = save_atomic({"blocks.7.att.key.bone": torch.zeros(8, 16, 16)}, tmp_path / "deep.pth")
    _refused(work, base7, "--lora", extra, pattern=r"blocks\.7\.att\.key\.bone adapts blocks\.7\.att\.key\.weight,"
             " which .* has not")
    wide = save_atomic({"blocks.0.att.key.bone": torch.zeros(8, 32, 32)}, tmp_path / "wide.pth")
    _refused(work, base7, "--lora", wide, pattern=r"blocks\.0\.att\.key\.bone: bone \[8, 32, 32\] needs")
    whole = save_atomic({"blocks.0.att.key.bone": torch.zeros(8, 16, 16), "blocks.0.ln1.weight": torch.ones(64)},
                        tmp_path / "whole.pth")
    _refused(work, base7, "--lora", whole, pattern=r"blocks\.0\.ln1\.weight is \[64\], and .* has \[128\]")
    init = torch.load(pissa.init, weights_only=True)
    init.pop(next(iter(init)))
    partial = save_atomic(init, tmp_path / "partial-init.pth")
    _refused(work, base7, "--lora", pissa.path, "--lora-init", partial, pattern="is missing: this init file is not")
    state = save_atomic({f"blocks.{i}.att.time_state": torch.zeros(2, 64, 64) for i in range(7)},
                        tmp_path / "state.pth")
    _refused(work, base7, "--lora", state, pattern="it is a state-tuning file: give it as --state")
    nan = {k: v.clone() for k, v in torch.load(bone7.path, weights_only=True).items()}
    nan[next(iter(nan))][0, 0, 0] = float("nan")
    _refused(work, base7, "--lora", save_atomic(nan, tmp_path / "nan.pth"), pattern="NaN or infinite")
    assert sd  # the base was read, never written
    assert list(work.iterdir()) == []


def test_pth_round_trip_is_exact_and_gguf_f32_comes_back(fixture_dir, tmp_path):
    tokens = tokens_for(512)[:24]
    base = fixture_path("v6", directory=fixture_dir)
    again = rwkv_convert.convert(base, "pth", tmp_path / "again.pth")[0]
    a, b = torch.load(base, weights_only=True), torch.load(again, weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    gguf = rwkv_convert.convert(base, "gguf", tmp_path / "f32.gguf", quant="f32")[0]
    back = rwkv_convert.convert(gguf, "pth", tmp_path / "back.pth")[0]
    original, same, from_gguf = _pip_logits([base, again, back], False, tokens)
    assert torch.equal(original, same)
    assert (original - from_gguf).abs().max().item() < 1e-5


def test_pth_dtype_option_casts_every_tensor(fixture_dir, tmp_path):
    base = fixture_path("v7", directory=fixture_dir)
    out = rwkv_convert.convert(base, "pth", tmp_path / "bf16.pth", dtype="bf16")[0]
    assert {t.dtype for t in torch.load(out, weights_only=True).values()} == {torch.bfloat16}


def test_release_sources_merge_adapters_and_report_their_hashes(adapters, tmp_path):
    base, ref, _ = adapters["v6", "lora"]
    release = tmp_path / "ft.toml"
    release.write_text(f'[release]\ntokens = 8\n[sources]\nft = {{ model = "{base}", lora = "{ref.path}",'
                       f' lora_alpha = 16 }}\n[[artifact]]\nto = "pth"\n', encoding="utf-8")
    proc = cli("release", release, "--out", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((tmp_path / "out" / "release-report.json").read_text())["artifacts"][0]
    assert entry["status"] == "passed"
    from rwkv_convert.checkpoint import file_sha256
    assert [f["sha256"] for f in entry["source_files"]] == [file_sha256(base), file_sha256(ref.path)]
    assert entry["source_files"][1]["alpha"] == 16.0
    written = torch.load(tmp_path / "out" / "ft-pth.pth", weights_only=True)
    assert torch.equal(written["blocks.1.ln2.weight"], torch.load(ref.path, weights_only=True)["blocks.1.ln2.weight"])
    release.write_text(release.read_text().replace("lora_alpha = 16", "lora_scale = 0.5"), encoding="utf-8")
    assert_one_line_error(cli("release", release, "--out", tmp_path / "out2"), r"\[sources\] ft: .*give --lora-alpha")
    assert not (tmp_path / "out2").exists()


def test_a_damaged_adapter_or_an_output_onto_it_is_refused(adapters, tmp_path):
    base, bone, _ = adapters["v7", "bone"]
    data = bytearray(bone.path.read_bytes())
    first = next(iter(torch.load(bone.path, weights_only=True).values()))
    at = bytes(data).find(first.numpy().tobytes()[:64])
    assert at > 0
    data[at + 5] ^= 0x10  # one bit of one value: still a finite float
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    assert_one_line_error(cli("convert", base, "--lora", damaged, "--to", "pth", "-o", tmp_path / "x.pth"),
                          "CRC|damaged")
    before = bone.path.read_bytes()
    assert_one_line_error(cli("convert", base, "--lora", bone.path, "--to", "pth", "-o", bone.path))
    assert bone.path.read_bytes() == before and not (tmp_path / "x.pth").exists()
