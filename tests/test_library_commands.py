"""Every CLI command's work is one library call (cli.py only parses and prints): each is called here directly, on
the bundled trained RWKV-7, without the CLI."""

from __future__ import annotations

import pytest
import torch

from rwkv_convert import doctor, quality, release, state_file
from rwkv_convert.bundled import trained_model
from rwkv_convert.describe import describe_path
from rwkv_convert.fixtures import check_variant, fixture_path
from rwkv_convert.formats import registry
from rwkv_convert.generate import generate, prepare_run
from rwkv_convert.plan import make_plan
from rwkv_convert.runner import Model
from rwkv_convert.verify import verify

from .test_state_files import make_state

BUNDLED = "bundled:v7"


def test_inspect_plan_and_run_are_library_calls():
    info = describe_path(BUNDLED)
    spec = registry.read_checkpoint(BUNDLED).spec
    assert info and spec.n_layer == 3 and spec.vocab_size == 257
    ckpt = registry.read_checkpoint(BUNDLED)
    planned = make_plan(ckpt.spec, ckpt.shapes, "cpu fp32i8 *1 -> cpu fp32").to_dict()
    assert [s["weights"] for s in planned["slots"]][:2] == ["i8", "fp32"] and planned["n_layer"] == 3
    setup = prepare_run(None, None, None)
    assert setup.prompt == "class " and setup.notes and "bundled" in setup.notes[0]
    text = "".join(generate(setup.model, setup.tokenizer, setup.prompt, 8, temperature=0))
    assert text == "".join(generate(setup.model, setup.tokenizer, setup.prompt, 8, temperature=0))  # greedy


def test_convert_and_verify_are_library_calls(tmp_path):
    out = tmp_path / "m.safetensors"
    written = registry.convert(BUNDLED, to="safetensors", layout="prepared", output=out, strategy="cpu bf16")
    assert written == [out]
    report = verify(out, BUNDLED, tokens=8)
    assert report.passed and report.scheme == "bf16"


def test_quality_doctor_release_state_and_fixture_are_library_calls(tmp_path):
    names, max_bytes = quality.choose(None, False, None)
    assert names[0] == "fp32" and max_bytes == quality.QUICK_BYTES
    report = quality.measure(BUNDLED, None, ["fp32", "bf16"], 256, 2048)
    assert [r.scheme for r in report.results] == ["fp32", "bf16"] and report.results[0].kl == 0
    assert {c.name for c in doctor.run_checks()} >= {"torch", "onnxruntime", "llama-cpp-python", "rwkv"}
    request = release.open_release([], tmp_path / "out", only=["prepared-fp32i8-cal"])
    assert [a.name for a in request.chosen] == ["prepared-fp32i8-cal"] and request.reads
    spec = registry.read_checkpoint(trained_model("v7")).spec
    torch.save(make_state(spec, seed=1), tmp_path / "state.pth")
    path, state = state_file.convert_state(tmp_path / "state.pth", "safetensors", tmp_path / "state.st", spec)
    assert path.is_file() and len(state.layers) == spec.n_layer
    assert fixture_path(check_variant("v7"), n_layer=1, directory=tmp_path).is_file()


@pytest.mark.parametrize("version", ["v4", "v5.2", "v6", "v7"])
def test_the_runner_executes_the_plan_that_plan_prints(version, fixture_dir):
    ckpt = registry.read_checkpoint(fixture_path(version, directory=fixture_dir))
    for strategy in ("cpu fp16", "cpu bf16 *2 -> cpu fp32i8"):
        plan = make_plan(ckpt.spec, ckpt.shapes, strategy)
        model = Model(ckpt, plan)
        assert model.plan is plan and model.placements is plan.placements
        assert model.rescale_layer == plan.rescale_layer and model.passes == plan.passes, (strategy, model.passes)
        again = Model(ckpt, strategy)  # a string is planned the same way
        assert again.plan.to_dict() == plan.to_dict()
        tokens = [1, 2, 3, 4]
        assert torch.equal(model.forward(tokens, None)[0], again.forward(tokens, None)[0])
