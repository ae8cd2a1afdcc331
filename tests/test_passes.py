"""Load-time passes: pure functions, and the model with each pass equals the model without it."""

from __future__ import annotations

import pytest
import torch

import rwkv_convert
from rwkv_convert import passes
from rwkv_convert.arch import v4, v5
from rwkv_convert.fixtures import VARIANTS, fixture_path
from rwkv_convert.quant import scheme_for

FP32_ROUNDING = 1e-4


def logits(model, tokens):
    seq = model.forward(tokens, full_output=True)[0]
    _, state = model.forward(tokens[:5])
    one = model.forward(tokens[5:6], state)[0]
    return seq, one


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("skipped", [(passes.FOLD_LN0,), (passes.STACK,), (passes.FOLD_LN0, passes.STACK)])
def test_model_without_a_pass_equals_the_model_with_it(variant, skipped, fixture_dir):
    ckpt = rwkv_convert.read_checkpoint(fixture_path(variant, "fp32", directory=fixture_dir))
    full = rwkv_convert.Model(ckpt)
    partial = rwkv_convert.Model(ckpt, skip_passes=skipped)
    assert set(skipped).isdisjoint(partial.passes) and set(skipped) <= set(full.passes)
    tokens = list(range(3, 30))
    for a, b in zip(logits(full, tokens), logits(partial, tokens), strict=True):
        assert (a - b).abs().max().item() <= FP32_ROUNDING


@pytest.mark.parametrize("variant", ["v4", "v5.2", "v6"])
def test_fp16_rescale_is_exact_up_to_layernorm_eps_in_fp32(variant, fixture_dir):
    ckpt = rwkv_convert.read_checkpoint(fixture_path(variant, "fp32", directory=fixture_dir))
    rescaled, plain = rwkv_convert.Model(ckpt, rescale_layer=6), rwkv_convert.Model(ckpt, rescale_layer=0)
    assert passes.RESCALE in rescaled.passes and passes.RESCALE not in plain.passes
    tokens = list(range(3, 30))
    # Halving x makes LayerNorm's eps (1e-5) count four times more for the norms after layer 6: ~1e-5
    # relative, so ~1.4e-4 measured on logits of magnitude ~13.
    for a, b in zip(logits(rescaled, tokens), logits(plain, tokens), strict=True):
        assert (a - b).abs().max().item() <= 5e-4


def test_passes_do_not_touch_their_input(fixture_dir):
    tensors = dict(rwkv_convert.read_checkpoint(fixture_path("v5.2", directory=fixture_dir)).tensors)
    before = {k: v.clone() for k, v in tensors.items()}
    folded = passes.fold_ln0(tensors)
    assert "blocks.0.ln0.weight" in tensors and "blocks.0.ln0.weight" not in folded
    layer = {k[len("blocks.1."):]: v for k, v in tensors.items() if k.startswith("blocks.1.")}
    passes.rescale_for_fp16(layer, 13, 6)
    passes.precompute_decay(layer, v5, rwkv_convert.read_checkpoint(
        fixture_path("v5.2", directory=fixture_dir)).spec, 1)
    weights = {n: scheme_for("fp32").quantize(layer[n], torch.float32) for n in v5.PROJECTIONS}
    stacked = passes.stack_projections(weights, v5.PROJECTIONS)
    assert set(weights) == set(v5.PROJECTIONS) and set(stacked) == {"att.projections"}
    assert all(torch.equal(tensors[k], before[k]) for k in before)


def test_fold_ln0_is_layernorm_in_fp32(fixture_dir):
    tensors = rwkv_convert.read_checkpoint(fixture_path("v6", "bf16", directory=fixture_dir)).tensors
    folded = passes.fold_ln0(tensors)
    expected = torch.nn.functional.layer_norm(tensors["emb.weight"].float(), (128,),
                                              tensors["blocks.0.ln0.weight"].float(),
                                              tensors["blocks.0.ln0.bias"].float(), eps=1e-5)
    assert folded["emb.weight"].dtype == torch.float32 and torch.equal(folded["emb.weight"], expected)


def test_decay_precomputation_per_version(fixture_dir):
    spec4 = rwkv_convert.read_checkpoint(fixture_path("v4", directory=fixture_dir)).spec
    td = torch.linspace(-5, 2, 128)
    out = passes.precompute_decay({"att.time_decay": td, "att.time_first": td}, v4, spec4, 0)
    assert torch.equal(out["att.time_decay"], -torch.exp(td))
    spec5 = rwkv_convert.read_checkpoint(fixture_path("v5.0", directory=fixture_dir)).spec
    layer = {"att.time_decay": torch.tensor([-1.0, 0.5]), "att.time_first": torch.tensor([0.1, -0.2]),
             "att.ln_x.weight": torch.ones(128), "att.ln_x.bias": torch.zeros(128)}
    out = passes.precompute_decay(layer, v5, spec5, 0)
    assert torch.allclose(out["att.time_decay"].flatten(), torch.exp(-torch.exp(torch.tensor([-1.0, 0.5]))))
    assert torch.allclose(out["att.bonus"].flatten(), torch.exp(torch.tensor([0.1, -0.2])))


def test_plan_and_model_record_the_passes(fixture_dir):
    path = fixture_path("v6", directory=fixture_dir)
    assert rwkv_convert.load(path).passes == [passes.FOLD_LN0, passes.DECAY, passes.STACK]
    assert passes.RESCALE in rwkv_convert.load(path, "cpu fp16").passes
    assert passes.STACK not in rwkv_convert.load(path, "cpu fp32i8").passes
