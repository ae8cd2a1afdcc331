"""Reading checkpoints: version detection, dims, wrappers, and every kind of bad input."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

import rwkv_convert
from rwkv_convert.fixtures import VARIANTS, fixture_path, make_state_dict

from .conftest import save_atomic

EXPECTED = {"v4": "4", "v5.0": "5.0", "v5.1": "5.1", "v5.2": "5.2", "v5.2-state": "5.2", "v6": "6",
            "v7": "7", "v7-layer0-v": "7"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_fixture_is_detected_with_its_dims(variant, dtype, fixture_dir):
    spec = rwkv_convert.read_checkpoint(fixture_path(variant, dtype, directory=fixture_dir)).spec
    assert spec.version == EXPECTED[variant]
    assert (spec.n_layer, spec.n_embd, spec.vocab_size) == (7, 128, 512)
    assert spec.time_state == (variant == "v5.2-state")
    assert list(spec.dtypes) == ["float32" if dtype == "fp32" else "bfloat16"]
    if variant != "v4":
        assert (spec.n_head, spec.head_size) == (2, 64)
    assert spec.n_params == sum(t.numel() for t in make_state_dict(variant).values())


def test_one_layer_v52_is_52_whatever_the_key_order(tmp_path):
    sd = make_state_dict("v5.2", n_layer=1)
    items = list(sd.items())
    for seed in range(3):
        random.Random(seed).shuffle(items)
        path = save_atomic(dict(items), tmp_path / f"v52-{seed}.pth")
        assert rwkv_convert.read_checkpoint(path).spec.version == "5.2"


def test_dims_come_from_the_file_not_from_defaults(tmp_path):
    sd = make_state_dict("v7", n_layer=3, n_embd=192, vocab=1000, ranks={"w": 8, "a": 12, "v": 20, "g": 28})
    spec = rwkv_convert.read_checkpoint(save_atomic(sd, tmp_path / "odd.pth")).spec
    assert (spec.n_layer, spec.n_embd, spec.vocab_size, spec.n_head, spec.head_size) == (3, 192, 1000, 3, 64)
    assert spec.lora_ranks == {"w": 8, "a": 12, "g": 28, "v": 20}
    sd = make_state_dict("v6", n_layer=2, n_embd=256, vocab=700, head_size=32, ranks={"maa": 16, "decay": 40})
    spec = rwkv_convert.read_checkpoint(save_atomic(sd, tmp_path / "v6.pth")).spec
    assert (spec.n_head, spec.head_size, spec.ffn_dim) == (8, 32, 896)
    assert spec.lora_ranks == {"maa": 16, "decay": 40}


def test_state_dict_wrapper_is_unwrapped(tmp_path, fixture_dir):
    sd = torch.load(fixture_path("v6", directory=fixture_dir), weights_only=True)
    path = save_atomic({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    assert rwkv_convert.read_checkpoint(path).spec.version == "6"


@pytest.mark.parametrize("variant, name, dims", [
    ("v7-deepembed", "7a", {"deep_embed": 32}),
    ("v7-dea", "7b", {"deep_embed": 32, "dea_query": 256, "dea_cache": 32})])
def test_v7_variants_are_detected_by_their_keys_not_their_order(variant, name, dims, tmp_path, fixture_dir):
    sd = torch.load(fixture_path(variant, directory=fixture_dir), weights_only=True)
    shuffled = save_atomic(dict(reversed(list(sd.items()))), tmp_path / "reversed.pth")
    for path in (fixture_path(variant, directory=fixture_dir), shuffled):
        spec = rwkv_convert.read_checkpoint(path).spec
        assert (spec.variant, spec.variant_dims, spec.version) == (name, dims, "7")
        layers = spec.n_layer
        assert spec.table_params == layers * 512 * (1024 + (256 + 128 if name == "7b" else 0))


def test_a_variant_missing_from_one_layer_is_one_line(tmp_path, fixture_dir):
    sd = torch.load(fixture_path("v7-deepembed", directory=fixture_dir), weights_only=True)
    del sd["blocks.3.ffn.s1"]
    path = save_atomic(sd, tmp_path / "hybrid.pth")
    with pytest.raises(rwkv_convert.RwkvConvertError, match=r"tensor blocks\.3\.ffn\.s1 is missing"):
        rwkv_convert.read_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def bad_files(tmp_path, fixture_dir):
    """(name, path, message pattern) for every bad input the readers must explain in one line."""
    good = fixture_path("v6", directory=fixture_dir)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"emb.weight": Evil()}))
    torch.save({"evil": Evil()}, tmp_path / "evil-zip.pth")
    save_atomic({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, tmp_path / "other.pth")
    sd = torch.load(good, weights_only=True)
    missing = dict(sd)
    del missing["blocks.3.att.time_decay_w2"]
    save_atomic(missing, tmp_path / "missing.pth")
    misshaped = dict(sd)
    misshaped["blocks.2.att.key.weight"] = torch.zeros(128, 64)
    save_atomic(misshaped, tmp_path / "misshaped.pth")
    (tmp_path / "text.pth").write_text("hello")
    return [
        ("missing path", tmp_path / "nope.pth", "no such file"),
        ("directory", tmp_path, "is a directory"),
        ("empty file", tmp_path / "empty.pth", "is empty"),
        ("truncated", tmp_path / "truncated.pth", "truncated or corrupt"),
        ("not a checkpoint", tmp_path / "text.pth", "not a readable PyTorch checkpoint"),
        ("code pickle", tmp_path / "evil.pth", "refusing to load .*would run code"),
        ("code pickle in zip", tmp_path / "evil-zip.pth", "refusing to load .*would run code"),
        ("not rwkv", tmp_path / "other.pth", "not an RWKV checkpoint: missing emb.weight"),
        ("missing tensor", tmp_path / "missing.pth",
         r"blocks\.3\.att\.time_decay_w2 is missing \(expected shape \[64, 128\]"),
        ("mis-shaped tensor", tmp_path / "misshaped.pth",
         r"blocks\.2\.att\.key\.weight has shape \[128, 64\], expected \[128, 128\]"),
    ]


def test_bad_files_raise_one_clear_error(tmp_path, fixture_dir):
    for name, path, pattern in bad_files(tmp_path, fixture_dir):
        with pytest.raises(rwkv_convert.RwkvConvertError, match=pattern) as info:
            rwkv_convert.read_checkpoint(path)
        assert "\n" not in str(info.value), name
