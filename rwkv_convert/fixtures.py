"""Deterministic tiny checkpoints with the exact key names and shapes of BlinkDL's files.

Values are drawn in the ranges trained models have (mixes in [0, 1], decays as in real files, LayerNorm
weights near 1) so that nothing is degenerate. Files are made on demand into a cache directory."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import torch

from .atomic import AtomicOutput
from .errors import RwkvConvertError
from .paths import cache_root

GENERATOR_VERSION = 1  # bump when values change, so cached files are remade
VARIANTS = ("v4", "v5.0", "v5.1", "v5.2", "v5.2-state", "v6", "v7", "v7-layer0-v")
EXTRA_VARIANTS = ("v7-deepembed", "v7-dea")  # DeepEmbed ("7a") and DeepEmbed + DEA ("7b")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_VARIANT = "v7"


def cache_dir() -> Path:
    return cache_root() / "fixtures"


class _Draw:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def uniform(self, shape, low, high):
        return torch.rand(shape, generator=self.gen) * (high - low) + low

    def normal(self, shape, std):
        return torch.randn(shape, generator=self.gen) * std

    def linear(self, out_dim, in_dim, gain=1.0):  # [out, in], unit-variance outputs for unit inputs
        return self.normal((out_dim, in_dim), gain / in_dim ** 0.5)

    def norm(self, prefix, dim, w=(0.7, 1.3)):
        return {prefix + ".weight": self.uniform((dim,), *w), prefix + ".bias": self.normal((dim,), 0.05)}

    def mix(self, C):
        return self.uniform((1, 1, C), 0.0, 1.0)


def make_state_dict(variant: str, n_layer: int = 7, n_embd: int = 128, vocab: int = 512,
                    head_size: int = 64, seed: int | None = None,
                    ranks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """An fp32 state dict for `variant` (one of VARIANTS or EXTRA_VARIANTS). `ranks` overrides the LoRA
    ranks (v6: maa, decay; v7: w, a, v, g)."""
    if variant not in VARIANTS + EXTRA_VARIANTS:
        raise ValueError(f"unknown fixture variant {variant!r}; choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    C, H, N = n_embd, n_embd // head_size, head_size
    d = _Draw(zlib.crc32(f"{variant}/{n_layer}/{n_embd}/{vocab}".encode()) if seed is None else seed)
    version = variant.split("-")[0]
    sd: dict[str, torch.Tensor] = {"emb.weight": d.normal((vocab, C), 0.5)}
    sd.update(d.norm("blocks.0.ln0", C))
    ffn = {"v4": 4 * C, "v7": 4 * C, "v6": int(3.5 * C // 32 * 32)}.get(version, int(3.5 * C // 32 * 32))
    for i in range(n_layer):
        b = f"blocks.{i}."
        sd.update(d.norm(b + "ln1", C))
        sd.update(d.norm(b + "ln2", C))
        att = {
            b + "att.receptance.weight": d.linear(C, C), b + "att.key.weight": d.linear(C, C),
            b + "att.value.weight": d.linear(C, C), b + "att.output.weight": d.linear(C, C, 0.5),
        }
        ffn_w = {b + "ffn.key.weight": d.linear(ffn, C), b + "ffn.value.weight": d.linear(C, ffn, 0.5)}
        if version == "v4":
            att.update({
                b + "att.time_decay": d.uniform((C,), -5.0, 2.0), b + "att.time_first": d.uniform((C,), -2.0, 1.0),
                b + "att.time_mix_k": d.mix(C), b + "att.time_mix_v": d.mix(C), b + "att.time_mix_r": d.mix(C),
            })
        elif version.startswith("v5"):
            per_channel = version == "v5.2"
            shape = (H, N) if per_channel else (H,)
            att.update({
                b + "att.time_decay": d.uniform(shape, -6.0, 1.0),
                b + "att.time_mix_k": d.mix(C), b + "att.time_mix_v": d.mix(C), b + "att.time_mix_r": d.mix(C),
            })
            if per_channel:
                att[b + "att.time_faaaa"] = d.uniform(shape, -0.5, 1.0)
            else:  # v5.0/5.1 store log(u)
                att[b + "att.time_first"] = d.uniform(shape, -1.5, 0.5)
            if version != "v5.0":
                att.update({b + "att.time_mix_g": d.mix(C), b + "att.gate.weight": d.linear(C, C)})
            att.update(d.norm(b + "att.ln_x", C))
            if variant == "v5.2-state":
                att[b + "att.time_state"] = d.normal((H, N, N), 0.3)
        elif version == "v6":
            Dm, Dd = (ranks or {}).get("maa", 32), (ranks or {}).get("decay", 64)
            att.update({b + f"att.time_maa_{n}": d.mix(C) for n in "xwkvrg"})
            att.update({
                b + "att.time_maa_w1": d.normal((C, 5 * Dm), 0.1), b + "att.time_maa_w2": d.normal((5, Dm, C), 0.1),
                b + "att.time_decay": d.uniform((1, 1, C), -6.0, 1.0),
                b + "att.time_decay_w1": d.normal((C, Dd), 0.1), b + "att.time_decay_w2": d.normal((Dd, C), 0.1),
                b + "att.time_faaaa": d.uniform((H, N), -0.5, 1.0), b + "att.gate.weight": d.linear(C, C),
            })
            att.update(d.norm(b + "att.ln_x", C))
        else:  # v7; ranks differ from each other so that a mix-up of LoRAs cannot go unnoticed
            ranks = {"w": 32, "a": 24, "v": 16, "g": 48, **(ranks or {})}
            att.update({b + f"att.x_{n}": d.mix(C) for n in "rwkvag"})
            att.update({
                b + "att.w0": d.uniform((1, 1, C), -4.0, 2.0), b + "att.a0": d.uniform((1, 1, C), -1.0, 1.0),
                b + "att.k_k": d.uniform((1, 1, C), 0.5, 1.5), b + "att.k_a": d.uniform((1, 1, C), 0.5, 1.5),
                b + "att.r_k": d.normal((H, N), 0.5),
            })
            loras = ["w", "a", "g"] + (["v"] if i > 0 or variant == "v7-layer0-v" else [])
            for name in loras:
                r = ranks[name]
                att[b + f"att.{name}1"] = d.normal((C, r), 0.1)
                att[b + f"att.{name}2"] = d.normal((r, C), 1.0 / r ** 0.5 if name == "g" else 0.1)
            if "v" in loras:
                att[b + "att.v0"] = d.uniform((1, 1, C), -1.0, 1.0)
            att.update(d.norm(b + "att.ln_x", C))
        sd.update(att)
        sd.update(ffn_w)
        if version == "v7":
            sd[b + "ffn.x_k"] = d.mix(C)
            if variant in ("v7-deepembed", "v7-dea"):
                sd.update({b + "ffn.s_emb.weight": d.normal((vocab, 1024), 0.1),
                           b + "ffn.s_emb_x.weight": d.normal((1024, C), 0.01),
                           b + "ffn.s0": d.uniform((1, 1, ffn), 0.5, 1.5), b + "ffn.s1": d.normal((C, 32), 0.1),
                           b + "ffn.s2": d.normal((32, ffn), 0.1)})
            if variant == "v7-dea":  # query width 256, 32-wide caches (reference/deepembed-and-dea.md)
                sd.update({b + "qkv.qq.weight": d.linear(256, C), b + "qkv.k1": d.normal((C, 32), 0.2),
                           b + "qkv.k2": d.normal((32, 256), 0.3),
                           b + "qkv.k_emb.weight": d.uniform((vocab, 256), 0.5, 1.5),
                           b + "qkv.k_emb_x.weight": d.normal((256, C), 0.02), b + "qkv.v1": d.normal((C, 32), 0.2),
                           b + "qkv.v2": d.normal((32, C), 0.3), b + "qkv.v_emb.weight": d.normal((vocab, C), 0.5),
                           b + "qkv.v_emb_x.weight": d.normal((C, C), 0.02), b + "qkv.x_q": d.mix(256),
                           b + "qkv.x_k": d.mix(256), b + "qkv.x_v": d.mix(C)})
                for norm, width in (("lnq", 256), ("lnk", 256), ("lnv", C)):
                    sd.update(d.norm(b + f"qkv.{norm}", width))
        else:
            key = "time_maa" if version == "v6" else "time_mix"
            sd.update({b + f"ffn.{key}_k": d.mix(C), b + f"ffn.{key}_r": d.mix(C),
                       b + "ffn.receptance.weight": d.linear(C, C)})
    sd.update(d.norm("ln_out", C))
    sd["head.weight"] = d.linear(vocab, C, 3.0)  # logits of magnitude ~8, like trained models
    return sd


def check_variant(variant: str) -> str:
    """The variant, or one line naming the known ones."""
    if variant not in VARIANTS + EXTRA_VARIANTS:
        known = ", ".join(VARIANTS + EXTRA_VARIANTS)
        raise RwkvConvertError(f"unknown fixture variant {variant!r}; choose from {known}")
    return variant


def fixture_path(variant: str = DEFAULT_VARIANT, dtype: str = "fp32", n_layer: int = 7,
                 directory: str | os.PathLike | None = None, n_embd: int = 128, vocab: int = 512,
                 head_size: int = 64) -> Path:
    """The cached fixture file, made (atomically) if it is not there yet."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown fixture dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    folder = Path(directory) if directory else cache_dir()
    shape = "" if (n_embd, vocab) == (128, 512) else f"-C{n_embd}-V{vocab}"
    shape += "" if head_size == 64 else f"-N{head_size}"
    path = folder / f"rwkv-{variant}-L{n_layer}{shape}-{dtype}-g{GENERATOR_VERSION}.pth"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.to(DTYPES[dtype]).contiguous()
              for k, v in make_state_dict(variant, n_layer, n_embd, vocab, head_size).items()}
        buffer = io.BytesIO()  # torch.save into a file raises RuntimeError on a failed write; f.write an OSError
        torch.save(sd, buffer)
        with AtomicOutput(path) as out, open(out.temp(), "wb") as f:
            f.write(buffer.getbuffer())
    return path
