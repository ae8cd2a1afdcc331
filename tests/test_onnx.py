"""ONNX export checked in onnxruntime itself: step and sequence graphs, batches, the state fed back, fp16,
int8/int4 (MatMulNBits), external data, and the errors of the runner that loads exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv_convert
from rwkv_convert.bounds import TOLERANCES
from rwkv_convert.errors import RwkvConvertError, UnsupportedError
from rwkv_convert.fixtures import EXTRA_VARIANTS, VARIANTS, fixture_path, make_state_dict
from rwkv_convert.metrics import compare

from .conftest import ODD_SHAPES, save_atomic, tokens_for
from .test_cli import assert_one_line_error, cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from rwkv_convert.runtimes.onnx_layout import sequence_path  # noqa: E402
from rwkv_convert.runtimes.onnx_runtime import OnnxModel  # noqa: E402

ONNX_VARIANTS = [*VARIANTS, *EXTRA_VARIANTS]  # DeepEmbed and DEA too: per-token tables gathered in the graph
SPLIT = 20


def streams(vocab: int, batch: int) -> list[list[int]]:
    return [tokens_for(vocab, seed=1234 + b) for b in range(batch)]


def reference_run(model, tokens):
    """Every position's logits and the final state, from our runner."""
    return model.forward(tokens, full_output=True)


def assert_runs_like(exported: OnnxModel, reference, vocab: int, bound: float, batch: int) -> None:
    rows = streams(vocab, batch)
    refs = [reference_run(reference, toks) for toks in rows]
    want = torch.stack([r[0] for r in refs])
    tokens = np.array(rows)
    # one call of the sequence graph
    seq, _ = exported.forward_batch(tokens, full_output=True)
    assert np.abs(seq - want.numpy()).max() <= bound
    # token by token through the step graph
    state, steps = None, []
    for t in range(tokens.shape[1]):
        logits, state = exported.forward_batch(tokens[:, t:t + 1], state)
        steps.append(logits)
    assert np.abs(np.stack(steps, 1) - want.numpy()).max() <= bound
    # 20 + 44 with the state fed back
    first, state = exported.forward_batch(tokens[:, :SPLIT], full_output=True)
    second, state = exported.forward_batch(tokens[:, SPLIT:], state, full_output=True)
    assert np.abs(np.concatenate([first, second], 1) - want.numpy()).max() <= bound
    # the state itself, in the runner's layout, row by row
    for b in range(batch):
        mine = exported.to_runner_state(*(part[b:b + 1] for part in state))
        finite = [(x, y) for x, y in zip(mine, refs[b][1], strict=True)]
        worst = max(((x - y)[y.abs() < 1e29]).abs().max().item() for x, y in finite)
        assert worst <= 1e-3, worst


@pytest.fixture(scope="module")
def fp32_exports(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {v: rwkv_convert.convert(fixture_path(v, directory=fixture_dir), "onnx", out / f"{v}.onnx")
            for v in ONNX_VARIANTS}


@pytest.mark.parametrize("variant", ONNX_VARIANTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_step_and_sequence_graphs_match_the_reference(variant, batch, fp32_exports, fixture_dir):
    step, seq, _data = fp32_exports[variant]
    assert seq == sequence_path(step)
    for path in (step, seq):
        onnx.checker.check_model(str(path))
    reference = rwkv_convert.load(fixture_path(variant, directory=fixture_dir))
    assert_runs_like(OnnxModel(step), reference, reference.spec.vocab_size, 1e-4, batch)


VARIANT_SHAPES = {  # DeepEmbed and DEA at head size 32 and widths, vocabularies the fixtures lack
    "v7-deepembed-C160-N32-V1000-L3": ("v7-deepembed", dict(n_layer=3, n_embd=160, vocab=1000, head_size=32)),
    "v7-dea-C96-N32-V700-L2": ("v7-dea", dict(n_layer=2, n_embd=96, vocab=700, head_size=32)),
}


@pytest.mark.parametrize("name", sorted(ODD_SHAPES) + sorted(VARIANT_SHAPES))
def test_shapes_the_fixtures_lack(name, tmp_path):
    variant, kw = {**ODD_SHAPES, **VARIANT_SHAPES}[name]
    src = save_atomic(make_state_dict(variant, **kw), tmp_path / "odd.pth")
    exported = OnnxModel(rwkv_convert.convert(src, "onnx", tmp_path / "odd.onnx")[0])
    assert_runs_like(exported, rwkv_convert.load(src), kw["vocab"], 1e-4, 2)


@pytest.mark.parametrize("variant", ONNX_VARIANTS)
@pytest.mark.parametrize("dtype,quant,key", [("fp16", "none", "fp16"), ("fp32", "int8", "int8-block"),
                                             ("fp16", "int8", "int8-block"), ("fp32", "int4", "int4-block")])
def test_reduced_precision_exports_within_the_tolerance_table(variant, dtype, quant, key, fixture_dir, tmp_path):
    src = fixture_path(variant, directory=fixture_dir)
    paths = rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx", dtype=dtype, quant=quant)
    exported = OnnxModel(paths[0])
    assert exported.scheme == key
    graph = onnx.load(str(paths[0]))
    ops = {n.op_type for n in graph.graph.node}
    assert ("MatMulNBits" in ops) == (quant != "none")
    if dtype == "fp16":  # weights are stored in fp16; inputs, outputs and the state stay fp32
        types = {i.name: i.data_type for i in graph.graph.initializer}
        assert types["head.weight"] == types["blocks.0.ln1.weight"] == onnx.TensorProto.FLOAT16
        outputs = {o.type.tensor_type.elem_type for o in graph.graph.output if o.name != "context_out"}  # DEA's ids
        assert outputs == {onnx.TensorProto.FLOAT}
    toks = tokens_for(512)
    ref = rwkv_convert.load(src).forward(toks, full_output=True)[0]
    tol = TOLERANCES[key]
    state, rows = None, []
    for t in toks:  # the step graph
        logits, state = exported.forward_batch([[t]], state)
        rows.append(logits[0])
    for cand in (exported.forward(toks, full_output=True)[0], torch.from_numpy(np.stack(rows))):
        max_abs, rel_l2, kl, top1 = compare(ref, cand)
        assert max_abs <= tol.max_abs and rel_l2 <= tol.rel_l2 and kl <= tol.kl and top1 >= tol.top1, \
            (max_abs, rel_l2, kl, top1)


def test_int8_export_quantizes_only_the_layers(fixture_dir, tmp_path):
    paths = rwkv_convert.convert(fixture_path("v7", directory=fixture_dir), "onnx", tmp_path / "m.onnx", quant="int8")
    names = {i.name for i in onnx.load(str(paths[0])).graph.initializer}
    assert "emb.weight" in names and "head.weight" in names  # kept at the chosen precision
    assert "blocks.0.att.key.weight.q8" in names and "blocks.0.att.key.weight" not in names


@pytest.mark.parametrize("variant", ["v4", "v6", "v7"])
@pytest.mark.parametrize("quant,dtype", [("int4", "fp32"), ("int8", "fp16")])
def test_quantizing_the_embedding_and_head_too(variant, quant, dtype, tmp_path):
    """--quant-embedding-head: the whole model in --onnx-quant's bits (GatherBlockQuantized, MatMulNBits), on a
    width the fixtures lack; within the same scheme's bounds, and smaller than the layers-only export."""
    src = save_atomic(make_state_dict(variant, n_layer=2, n_embd=192, vocab=1000, head_size=32), tmp_path / "m.pth")
    layers = rwkv_convert.convert(src, "onnx", tmp_path / "layers.onnx", quant=quant, dtype=dtype, graphs="sequence",
                                  quant_embedding_head=False)
    whole = rwkv_convert.convert(src, "onnx", tmp_path / "all.onnx", quant=quant, dtype=dtype, graphs="sequence",
                                 quant_embedding_head=True)
    graph = onnx.load(str(whole[0]))
    names = {i.name for i in graph.graph.initializer}
    bits = quant[-1]
    assert f"emb.weight.q{bits}" in names and f"head.weight.q{bits}" in names
    assert "emb.weight" not in names and "head.weight" not in names
    assert "GatherBlockQuantized" in {n.op_type for n in graph.graph.node}
    act_bytes = 2 if dtype == "fp16" else 4  # per value: the float table, then bits/8 plus a scale per 32
    saved = 2 * 1000 * 192 * (act_bytes - int(bits) / 8 - act_bytes / 32)
    assert layers[0].stat().st_size - whole[0].stat().st_size > 0.95 * saved
    model = OnnxModel(whole[0])
    assert model.meta["rwkv.quant_scope"] == "all"
    toks = tokens_for(1000)
    ref = rwkv_convert.load(src).forward(toks, full_output=True)[0]
    tol = TOLERANCES[model.scheme]
    max_abs, rel_l2, kl, top1 = compare(ref, model.forward(toks, full_output=True)[0])
    assert max_abs <= tol.max_abs and rel_l2 <= tol.rel_l2 and kl <= tol.kl and top1 >= tol.top1, \
        (max_abs, rel_l2, kl, top1)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_exports_keep_float_tables_and_int8_lora_factors(quant, tmp_path):
    """The measured default: the embedding and head float (int8 tables would cost 1.4% more KL beside int4 layers),
    the LoRA factors int8 MatMulNBits (a quarter of the bytes of an int4 file otherwise), where their inputs are
    whole blocks (rank 48: float); --quant-embedding-head quantizes the tables."""
    import onnx

    sd = make_state_dict("v7", n_layer=2, n_embd=128, vocab=300, ranks={"w": 32, "a": 64, "v": 48, "g": 32})
    src = save_atomic(sd, tmp_path / "m.pth")
    (path,) = rwkv_convert.convert(src, "onnx", tmp_path / "d.onnx", quant=quant, graphs="sequence")
    meta = OnnxModel(path).meta
    assert meta["rwkv.table_quant"] == "none" and meta["rwkv.lora_quant"] == "int8"
    graph = onnx.load(str(path), load_external_data=False).graph
    quantized = {n.input[1].rsplit(".", 1)[0]: {a.name: a.i for a in n.attribute}["bits"] for n in graph.node
                 if n.op_type == "MatMulNBits"}
    assert quantized["blocks.1.att.w1"] == quantized["blocks.1.att.w2"] == quantized["blocks.1.att.a2"] == 8
    assert quantized["blocks.1.att.key.weight"] == {"int4": 4, "int8": 8}[quant]
    assert "blocks.1.att.v1" in quantized and "blocks.1.att.v2" not in quantized  # 48 inputs: not whole blocks
    assert "head.weight" not in quantized
    (tables,) = rwkv_convert.convert(src, "onnx", tmp_path / "t.onnx", quant=quant, graphs="sequence",
                                     quant_embedding_head=True)
    assert OnnxModel(tables).meta["rwkv.table_quant"] == quant


def test_two_graphs_share_one_data_file_that_moves_with_them(fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    a = tmp_path / "a"
    a.mkdir()
    paths = rwkv_convert.convert(src, "onnx", a / "m.onnx")
    assert [p.name for p in paths] == ["m.onnx", "m.seq.onnx", "m.onnx.data"]
    weights = rwkv_convert.load(src).spec.n_params * 4
    assert paths[0].stat().st_size < 200_000 and paths[1].stat().st_size < 200_000
    assert 0.9 * weights < paths[2].stat().st_size < 1.05 * weights  # one copy for both graphs (small ones inline)
    for path in paths[:2]:
        onnx.checker.check_model(str(path))
    b = tmp_path / "b"
    shutil.move(a, b)  # moved together: the graphs name their data relative to themselves
    moved = OnnxModel(b / "m.onnx")
    toks = tokens_for(512)
    ref = rwkv_convert.load(src).forward(toks, full_output=True)[0]
    assert (moved.forward(toks, full_output=True)[0] - ref).abs().max().item() <= 1e-4


def test_external_data_forced_for_one_graph(fixture_dir, tmp_path):
    src = fixture_path("v4", directory=fixture_dir)
    paths = rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx", graphs="step", external_data=True)
    assert [p.name for p in paths] == ["m.onnx", "m.onnx.data"]
    toks = tokens_for(512)[:8]
    ref = rwkv_convert.load(src).forward(toks, full_output=True)[0]
    assert (OnnxModel(paths[0]).forward(toks, full_output=True)[0] - ref).abs().max().item() <= 1e-4
    (inline,) = rwkv_convert.convert(src, "onnx", tmp_path / "inline.onnx", graphs="step")
    assert inline.stat().st_size > paths[1].stat().st_size  # one graph under 2 GB keeps its weights inside


def test_last_logits_sequence_graph(fixture_dir, tmp_path):
    src = fixture_path("v5.2", directory=fixture_dir)
    (seq,) = rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx", graphs="sequence", logits="last")
    exported = OnnxModel(seq)
    toks = tokens_for(512)
    logits, _ = exported.forward(toks)
    assert logits.shape == (512,)
    assert (logits - rwkv_convert.load(src).forward(toks)[0]).abs().max().item() <= 1e-4
    with pytest.raises(RwkvConvertError, match="only a sequence graph with the last logits"):
        exported.forward(toks, full_output=True)


def test_state_tuned_model_starts_from_its_learned_state(fp32_exports):
    exported = OnnxModel(fp32_exports["v5.2-state"][0])
    _, wkv = exported.init_batch_state(2)
    assert np.abs(wkv).max() > 0.1 and np.array_equal(wkv[0], wkv[1])


def test_wrong_states_and_foreign_files_get_clear_errors(fp32_exports, tmp_path):
    v7 = OnnxModel(fp32_exports["v7"][0])
    with pytest.raises(RwkvConvertError, match="needs 21"):
        v7.forward([1, 2], [torch.zeros(128)] * 35)  # a v4-shaped state list: 5 tensors per layer
    with pytest.raises(RwkvConvertError, match="wkv state has shape"):
        v7.forward_batch([[1, 2]], (np.zeros((1, 7, 2, 128), np.float32), np.zeros((1, 7, 3, 128), np.float32)))
    with pytest.raises(RwkvConvertError, match="state of layer 0"):
        v7.forward([1], [torch.zeros(128), torch.zeros(2, 64, 32), torch.zeros(128)] * 7)
    with pytest.raises(RwkvConvertError, match="outside|0..511"):
        v7.forward_batch([[512]])
    # an ONNX file that is not ours
    helper = onnx.helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "foreign.onnx")
    with pytest.raises(RwkvConvertError, match="not an ONNX export of rwkv-convert"):
        rwkv_convert.load(tmp_path / "foreign.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(RwkvConvertError, match="not a readable ONNX model"):
        rwkv_convert.load(tmp_path / "garbage.onnx")


@pytest.mark.slow
def test_cli_inspect_says_what_an_export_is_and_run_runs_it(fp32_exports):
    step = fp32_exports["v7"][0]
    proc = cli("inspect", step, "--json")  # what onnxruntime holds: the model's dims, its scheme, its files
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "an ONNX export" and info["version"] == "7" and info["weight_schemes"] == ["fp32"]
    assert [Path(f).name for f in info["files"]][:2] == [step.name, step.name.replace(".onnx", ".seq.onnx")]
    proc = cli("run", step, "--tokens", "4", "--seed", "1")
    assert proc.returncode == 0 and "Assistant:" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_cli_convert_and_verify(fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    proc = cli("convert", src, "--to", "onnx", "--onnx-quant", "int8", "-o", tmp_path / "m.onnx", "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxruntime" in proc.stdout and "int8-block" in proc.stdout and "PASS" in proc.stdout


@pytest.mark.slow
def test_refusals_are_one_line_and_leave_no_file(fixture_dir, tmp_path):
    src = save_atomic(make_state_dict("v6", n_layer=1, n_embd=80, head_size=16, ranks={"maa": 8, "decay": 8}),
                      tmp_path / "c80.pth")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsupportedError, match="not a multiple of 32"):
        rwkv_convert.convert(src, "onnx", out / "m.onnx", quant="int4")
    assert list(out.iterdir()) == []
    rwkv_convert.convert(src, "onnx", out / "m.onnx")  # float exports have no block constraint
    assert_one_line_error(cli("convert", src, "--to", "onnx", "-o", tmp_path / "m.bin"), "should end in .onnx")


@pytest.mark.slow
def test_readme_example_runs_with_plain_onnxruntime(tmp_path):
    """The README's example, as written, on full-vocabulary v4 (its -1e30 start) and v7 models."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- onnx-example.*?-->\n```python\n(.*?)```", readme, re.S).group(1)
    assert "rwkv_convert" not in code
    for variant in ("v4", "v7"):
        work = tmp_path / variant
        work.mkdir()
        sd = make_state_dict(variant, n_layer=2, n_embd=64, vocab=65536)
        rwkv_convert.convert(save_atomic(sd, tmp_path / f"{variant}.pth"), "onnx", work / "model.onnx")
        proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), "the example printed nothing"


@pytest.mark.parametrize("variant", ["v5.2", "v6"])
def test_chunked_recurrence_survives_extreme_decays(variant, tmp_path):
    """Decays of exp(-exp(8)) (the state erased every token) beside exp(-exp(-12)) (kept for ever): the sequence
    graph's chunked form must stay finite and equal to the per-token reference."""
    sd = make_state_dict(variant, n_layer=2)
    for i in range(2):
        decay = sd[f"blocks.{i}.att.time_decay"]
        flat = decay.view(-1)
        flat[::3], flat[1::3] = 8.0, -12.0
    src = save_atomic(sd, tmp_path / "extreme.pth")
    exported = OnnxModel(rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx")[0])
    toks = tokens_for(512)[:37]  # not a multiple of the chunk
    ref = rwkv_convert.load(src).forward(toks, full_output=True)[0]
    got = exported.forward(toks, full_output=True)[0]
    assert torch.isfinite(got).all() and (got - ref).abs().max().item() <= 1e-4


def test_checksums_cover_the_model_and_its_data_and_older_exports_still_load(tmp_path):
    """Our exports carry CRC-32s (rwkv.checksums) of the model file and each external weight; an export
    written before them (no entry) loads as it did, and an altered inline weight is refused before it runs."""
    from rwkv_convert.runtimes.onnx_checksums import CHECKSUMS_KEY

    src = save_atomic(make_state_dict("v6", n_layer=2, n_embd=64, vocab=256), tmp_path / "m.pth")
    out = rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx", graphs="step", external_data=False)[0]
    want = rwkv_convert.load(out).forward([1, 2, 3])[0]
    model = onnx.load(str(out))
    assert any(p.key == CHECKSUMS_KEY for p in model.metadata_props)
    # an older export: the same file without the entry
    old = tmp_path / "old.onnx"
    entry = next(p for p in model.metadata_props if p.key == CHECKSUMS_KEY)
    model.metadata_props.remove(entry)
    onnx.save(model, str(old))
    assert torch.equal(rwkv_convert.load(old).forward([1, 2, 3])[0], want)
    # one inline weight altered (a matrix under 1 KiB stays inline: the ln weights)
    model = onnx.load(str(out))
    weight = next(t for t in model.graph.initializer if t.name == "blocks.1.ln1.weight")
    raw = bytearray(weight.raw_data)
    raw[3] ^= 0x40
    weight.raw_data = bytes(raw)
    altered = tmp_path / "altered.onnx"
    onnx.save(model, str(altered))
    with pytest.raises(RwkvConvertError, match="the bytes of the model do not match the CRC-32"):
        rwkv_convert.load(altered)


# ---- our MatMulNBits blocks and calibrated exports ---------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
def test_our_matmul_nbits_blocks_are_what_onnxruntime_computes(bits, scale_dtype):
    """quant.matmul_nbits packs what onnxruntime reads: a one-node graph (fp32 products, accuracy_level 1) gives
    x @ W_q.T for our dequantized W_q, and our reading of onnxruntime's own packer agrees too. K = 96: an odd
    number of blocks, so the 4-bit zero points' padding nibble is exercised."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rwkv_convert.formats.onnx.emit import _nbits_quantizer
    from rwkv_convert.quant import matmul_nbits

    rng = np.random.default_rng(0)
    n, k = 40, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3] = 0.5  # a constant row: its blocks hold the value exactly
    w[5] = -0.25
    ours = matmul_nbits.quantize(w, bits, scale_dtype, importance=rng.random(k).astype(np.float32))
    theirs = [np.zeros((n, k // 32, 32 * bits // 8), np.uint8), np.zeros((n, k // 32), np.float32),
              np.zeros((n, (k // 32 * bits + 7) // 8), np.uint8)]
    _nbits_quantizer(bits)(theirs[0], np.ascontiguousarray(w.T), theirs[1], theirs[2], 32, n, k, False)
    np_act = np.float16 if scale_dtype == "fp16" else np.float32
    elem = TensorProto.FLOAT16 if scale_dtype == "fp16" else TensorProto.FLOAT
    x = rng.standard_normal((3, k)).astype(np_act)
    for data, scales, zero_points in (ours, theirs):
        scales = scales.astype(np_act)
        inits = [numpy_helper.from_array(a, name) for a, name in ((data, "b"), (scales, "s"), (zero_points, "z"))]
        node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n,
                                bits=bits, block_size=32, accuracy_level=1)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, [3, k])],
                                  [helper.make_tensor_value_info("y", elem, [3, n])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)], ir_version=8)
        y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].astype(np.float32)
        deq = matmul_nbits.dequantize(data, scales, zero_points, bits, k)
        want = x.astype(np.float32) @ deq.T
        assert np.abs(y - want).max() <= (2e-2 if scale_dtype == "fp16" else 1e-4) * np.abs(want).max()
    deq = matmul_nbits.dequantize(*ours[:1], ours[1].astype(np.float32), ours[2], bits, k)
    assert np.allclose(deq[3], 0.5, rtol=1e-3) and np.allclose(deq[5], -0.25, rtol=1e-3)


@pytest.mark.parametrize("variant,quant,whole", [("v6", "int4", False), ("v7", "int4", True), ("v7", "int8", False)])
def test_calibrated_exports_are_plain_matmul_nbits_within_the_scheme_bounds(variant, quant, whole, fixture_dir,
                                                                           tmp_path):
    """--calibration (GPTQ on the bundled text): the same ops and sizes as the plain export, within the scheme's
    bounds. The fp16 export rescales v6's later output matrices (7 layers, every 6) and GPTQ's blocks with them:
    it stays as near the reference as the fp32 export (measured KL 0.184 against 0.174; 0.29 between the two
    exports if the blocks were not rescaled). That calibration beats plain rounding is measured on the trained
    model (tests/test_quality.py): these random models' activations are not the text's."""
    src = fixture_path(variant, directory=fixture_dir)
    toks = tokens_for(512)
    ref = rwkv_convert.load(src).forward(toks, full_output=True)[0]
    kls = {}
    for dtype in ("fp32", "fp16"):
        common = dict(dtype=dtype, quant=quant, graphs="sequence", quant_embedding_head=whole)
        plain = rwkv_convert.convert(src, "onnx", tmp_path / f"plain-{dtype}.onnx", **common)[0]
        calibrated = rwkv_convert.convert(src, "onnx", tmp_path / f"cal-{dtype}.onnx", calibration="bundled",
                                          **common)[0]
        ops = [{n.op_type for n in onnx.load(str(p)).graph.node} for p in (plain, calibrated)]
        assert ops[0] == ops[1] and "MatMulNBits" in ops[1]
        assert abs(calibrated.stat().st_size - plain.stat().st_size) < 1024  # metadata only
        model = OnnxModel(calibrated)
        assert model.meta["rwkv.calibration"] == "gptq on the bundled text" and model.meta["rwkv.compute"] == "int8"
        tol = TOLERANCES[model.scheme]
        max_abs, rel_l2, kls[dtype], top1 = compare(ref, model.forward(toks, full_output=True)[0])
        assert max_abs <= tol.max_abs and rel_l2 <= tol.rel_l2 and kls[dtype] <= tol.kl and top1 >= tol.top1, \
            (dtype, max_abs, rel_l2, kls[dtype], top1)
    assert kls["fp16"] <= 1.25 * kls["fp32"], kls


def test_rounding_calibration_and_fp32_compute(fixture_dir, tmp_path):
    src = fixture_path("v7", directory=fixture_dir)
    (path,) = rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx", quant="int4", graphs="sequence",
                                   calibration="bundled", calibration_method="rounding", compute="fp32")
    graph = onnx.load(str(path))
    levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {1}
    model = OnnxModel(path)
    assert model.meta["rwkv.calibration"] == "rounding on the bundled text" and model.meta["rwkv.compute"] == "fp32"
    toks = tokens_for(512)
    max_abs, rel_l2, kl, top1 = compare(rwkv_convert.load(src).forward(toks, full_output=True)[0],
                                        model.forward(toks, full_output=True)[0])
    tol = TOLERANCES[model.scheme]
    assert kl <= tol.kl and top1 >= tol.top1


def test_calibration_without_quantization_is_refused(fixture_dir, tmp_path):
    proc = cli("convert", fixture_path("v7", directory=fixture_dir), "--to", "onnx", "--calibration", "bundled", "-o",
               tmp_path / "m.onnx")
    assert_one_line_error(proc, "--onnx-quant int8 or int4")
    assert list(tmp_path.iterdir()) == []


def test_the_tables_can_keep_8_bits_beside_4_bit_layers(fixture_dir, tmp_path):
    src = fixture_path("v7", directory=fixture_dir)
    (path,) = rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx", quant="int4", graphs="sequence",
                                   quant_embedding_head=True, embedding_head_quant="int8")
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert {"emb.weight.q8", "head.weight.q8", "blocks.0.att.key.weight.q4"} <= names
    model = OnnxModel(path)
    assert model.meta["rwkv.quant_scope"] == "all" and model.meta["rwkv.table_quant"] == "int8"
    toks = tokens_for(512)
    _, _, kl, top1 = compare(rwkv_convert.load(src).forward(toks, full_output=True)[0],
                             model.forward(toks, full_output=True)[0])
    assert kl <= TOLERANCES[model.scheme].kl and top1 >= TOLERANCES[model.scheme].top1
    proc = cli("convert", src, "--to", "onnx", "--onnx-quant", "int4", "--float-embedding-head",
               "--embedding-head-quant", "int8", "-o", tmp_path / "x.onnx")
    assert_one_line_error(proc, "--embedding-head-quant sets the bits of quantized embedding and head tables")
