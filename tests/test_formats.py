"""The format registry: what `inspect` says a checkpoint can become is exactly what `convert` does; files are
recognised by the one registry; the GGUF name tables match gguf-py's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

import rwkv_convert
from rwkv_convert.cli import main
from rwkv_convert.fixtures import EXTRA_VARIANTS, VARIANTS, fixture_path, make_state_dict
from rwkv_convert.formats import registry
from rwkv_convert.formats.gguf_tables import GLOBAL, READ_TABLES, WRITE_TABLES

from .conftest import ODD_SHAPES, save_atomic

# rwkv6 in gguf-py also lists one lerp tensor per mix; llama.cpp's loader takes the fused one instead.
OPTIONAL_RWKV6 = {f"blk.{{bid}}.time_mix_lerp_{n}" for n in "wkvrg"}
SUFFIX = {"pip": ".pth", "pth": ".pth", "gguf": ".gguf", "onnx": ".onnx", "hf": "", "prepared": ".safetensors",
          "web-rwkv": ".st",
          "mlx": ""}


def gguf_py_tensor_names(arch: str) -> set[str]:
    """gguf-py's tensor names for the architecture ({bid}: the layer), without the optional ones."""
    tensors = MODEL_TENSORS[{"rwkv6": MODEL_ARCH.RWKV6, "rwkv7": MODEL_ARCH.RWKV7}[arch]]
    return {TENSOR_NAMES[t] for t in tensors} - (OPTIONAL_RWKV6 if arch == "rwkv6" else set())


def _templates(rows) -> set[str]:
    return {row.gguf.rsplit(".", 1)[0].replace("{i}", "{bid}") for row in rows}


@pytest.mark.parametrize("version,arch", [("5.2", "rwkv6"), ("6", "rwkv6"), ("7", "rwkv7")])
def test_gguf_tables_name_exactly_gguf_pys_tensors(version, arch):
    assert _templates(GLOBAL) | _templates(WRITE_TABLES[version]) == gguf_py_tensor_names(arch)


@pytest.mark.parametrize("arch", ["rwkv6", "rwkv7"])
def test_every_gguf_row_read_back_names_our_tensors_once(arch):
    ours = [key for row in GLOBAL + READ_TABLES[arch] if row.make is None for key in row.ours]
    assert len(ours) == len(set(ours))


def _checkpoints(directory: Path) -> dict[str, Path]:
    found = {v: fixture_path(v, directory=directory) for v in VARIANTS + EXTRA_VARIANTS}
    found["v6-bf16"] = fixture_path("v6", "bf16", directory=directory)
    for name, (variant, kw) in ODD_SHAPES.items():
        found[name] = save_atomic(make_state_dict(variant, **kw), directory / f"caps-{name}.pth")
    # head size 32: llama.cpp's rwkv7 cannot run it (a refusal by spec, not by version)
    found["v7-head32"] = save_atomic(make_state_dict("v7", n_layer=2, n_embd=128, head_size=32),
                                     directory / "caps-v7-head32.pth")
    return found


def test_inspect_capabilities_say_exactly_what_convert_does(fixture_dir, tmp_path):
    runner = CliRunner()
    for name, src in _checkpoints(fixture_dir).items():
        shown = runner.invoke(main, ["inspect", str(src), "--json"])
        assert shown.exit_code == 0, shown.output
        capabilities = json.loads(shown.stdout)["capabilities"]
        for fmt in registry.writers():
            said = capabilities[f"convert --to {fmt.target}"]
            out = tmp_path / f"{name}-{fmt.name}{SUFFIX[fmt.name]}"
            args = ["convert", str(src), "--to", *fmt.target.split(), "-o", str(out)]
            done = runner.invoke(main, args)
            if said.startswith("yes"):
                assert done.exit_code == 0, (name, fmt.name, said, done.stderr)
                assert out.exists()
            else:  # "no: why", or "with options: what the defaults lack" (convert refuses it with the defaults)
                reason = said.removeprefix("no: ").removeprefix("with options: ")
                assert reason != said, said
                assert done.exit_code == 2, (name, fmt.name, said, done.stderr)
                assert done.stderr.strip() == f"error: cannot convert {src.name} to {fmt.target}: {reason}"
                assert not out.exists()


WRITTEN = [("pip", "pip", "c.pth"), ("gguf", "gguf", "m.gguf"), ("onnx", "onnx", "m.onnx"),
           ("web-rwkv", "safetensors", "m.st"), ("prepared", "safetensors", "p.bin"), ("hf", "safetensors", "hf-dir")]


@pytest.mark.parametrize("name,to,file_name", WRITTEN)
def test_the_registry_recognises_what_convert_wrote(name, to, file_name, fixture_dir, tmp_path):
    """By content, not by name: the prepared file is called .bin on purpose."""
    src = fixture_path("v7" if name == "hf" else "v6", directory=fixture_dir)
    layout = {"layout": name} if to == "safetensors" else {}
    rwkv_convert.convert(src, to, tmp_path / file_name, **layout)
    assert registry.detect(tmp_path / file_name)[0].name == name
    assert registry.detect(src)[0].name == "pth"


def test_blinkdl_keyed_safetensors_read_like_the_pth(fixture_dir, tmp_path):
    from safetensors.torch import save_file

    src = fixture_path("v5.2", directory=fixture_dir)
    sd = torch.load(src, weights_only=True)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    assert registry.detect(path)[0].name == "safetensors"
    a, b = rwkv_convert.load(src).forward([1, 2, 3])[0], rwkv_convert.load(path).forward([1, 2, 3])[0]
    assert torch.equal(a, b)


def test_convert_refuses_options_of_another_format(fixture_dir, tmp_path):
    src = fixture_path("v6", directory=fixture_dir)
    with pytest.raises(rwkv_convert.RwkvConvertError, match="onnx does not take strategy"):
        rwkv_convert.convert(src, "onnx", tmp_path / "m.onnx", strategy="cpu fp32")
    with pytest.raises(rwkv_convert.RwkvConvertError, match="needs --layout"):
        rwkv_convert.convert(src, "safetensors", tmp_path / "m.st")
    done = CliRunner().invoke(main, ["convert", str(src), "--to", "onnx", "--quant", "q8_0", "-o",
                                     str(tmp_path / "m.onnx")])
    assert done.exit_code == 2 and "--quant is an option of --to gguf, not of --to onnx" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_help_groups_options_by_format():
    text = CliRunner().invoke(main, ["convert", "--help"]).stdout
    starts = {fmt.name: text.index(f"--to {fmt.target}:") for fmt in registry.writers()}
    sections = {name: text[start:min([s for s in starts.values() if s > start], default=len(text))]
                for name, start in starts.items()}
    assert "--onnx-quant" in sections["onnx"] and "--graph" in sections["onnx"] and "--quant [" not in sections["onnx"]
    assert "--quant [" in sections["gguf"] and "--shard-size" in sections["hf"] and "--strategy" in sections["pip"]
