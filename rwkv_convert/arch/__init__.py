"""One module per RWKV version. This file only picks the module for a set of tensor names and shapes."""

from __future__ import annotations

import math
import re
from collections import Counter
from types import ModuleType

from ..errors import RwkvConvertError
from ..spec import ModelSpec
from ..strategy import Strategy
from . import v4, v5, v6, v7
from .common import squeezed

# Most specific first: v7 and v6 keys are unambiguous markers; v5 needs ln_x; v4 is what remains.
MODULES: tuple[ModuleType, ...] = (v7, v6, v5, v4)
REQUIRED_COMMON = ("emb.weight", "blocks.0.ln1.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight",
                   "ln_out.weight", "head.weight")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def module_for(version: str) -> ModuleType:
    for module in MODULES:
        if version in module.VERSIONS:
            return module
    raise RwkvConvertError(f"unknown RWKV version {version!r}")


def state_names(spec: ModelSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the state tensors of each layer, those after all layers) of this model, in the runner's flat list."""
    module = module_for(spec.version)
    per_layer = module.state_names(spec) if hasattr(module, "state_names") else module.STATE_NAMES
    return per_layer, (module.context_state_names(spec) if hasattr(module, "context_state_names") else ())


def token_tables(spec: ModelSpec) -> dict[str, str]:
    """{per-token table: the matrix that folds the embedding into it} for this model's layers (DeepEmbed, DEA)."""
    return {name: fold for name, fold in getattr(module_for(spec.version), "TOKEN_TABLES", {}).items()
            if (name.startswith("ffn.") and spec.deep_embed) or (name.startswith("qkv.") and spec.dea)}


def rescale_interval(spec: ModelSpec, strategy: Strategy) -> int:
    """The fp16 rescale interval of this model under this strategy (0: none; versions without it never)."""
    return strategy.rescale_layer() if module_for(spec.version).FP16_RESCALE else 0


def detect_version(shapes: dict[str, tuple[int, ...]], source: str = "the file") -> str:
    """Version from the key set and shapes only (never from key order)."""
    missing = [k for k in REQUIRED_COMMON if k not in shapes]
    if missing:
        raise RwkvConvertError(
            f"{source} is not an RWKV checkpoint: missing {', '.join(missing)}"
            f" (it has {len(shapes)} tensors, e.g. {', '.join(list(shapes)[:3]) or 'none'})")
    for module in MODULES:
        version = module.matches(shapes)
        if version:
            return version
    raise RwkvConvertError(
        f"{source} looks like an RWKV checkpoint but matches no known version: none of att.r_k (v7), "
        "att.time_maa_x (v6), att.ln_x (v5.x) or att.time_mix_k (v4) is in blocks.0")


def build_spec(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], source: str = "the file") -> ModelSpec:
    version = detect_version(shapes, source)
    module = module_for(version)
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    n_layer = max(layers) + 1
    try:
        vocab, n_embd = shapes["emb.weight"]
        details = module.describe(shapes)
        ffn_dim, att_dim = shapes["blocks.0.ffn.key.weight"][0], shapes["blocks.0.att.key.weight"][0]
    except KeyError as e:
        raise RwkvConvertError(f"{source} is an RWKV-{version} checkpoint without {e.args[0]}") from None
    except (IndexError, ValueError, TypeError):  # a tensor with fewer (or more) dimensions than its role has
        raise RwkvConvertError(
            f"{source} is an RWKV-{version} checkpoint whose tensor shapes do not fit together (emb.weight"
            f" {list(shapes['emb.weight'])}): the file is damaged or was saved with reshaped tensors") from None
    counts = Counter(dtypes.values())
    n_params = sum(math.prod(shape) for shape in shapes.values())
    spec = ModelSpec(
        version=version, n_layer=n_layer, n_embd=int(n_embd), vocab_size=int(vocab),
        ffn_dim=int(ffn_dim), att_dim=int(att_dim),
        time_state=any(k.endswith("att.time_state") for k in shapes),
        dtypes=dict(sorted(counts.items())), n_params=n_params, **details)
    return spec


def check_shapes(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], source: str = "the file") -> list[str]:
    """Raise on the first missing or mis-shaped tensor; return the keys the version does not use."""
    expected = module_for(spec.version).expected_shapes(spec)
    dims = f"n_embd={spec.n_embd}, n_layer={spec.n_layer}, vocab={spec.vocab_size}"
    if spec.n_head:
        dims += f", n_head={spec.n_head}, head_size={spec.head_size}"
    for key, shape in expected.items():
        if key not in shapes:
            raise RwkvConvertError(
                f"{source}: RWKV-{spec.version} tensor {key} is missing (expected shape {list(shape)}; {dims})")
        if squeezed(shapes[key]) != squeezed(shape):
            raise RwkvConvertError(
                f"{source}: tensor {key} has shape {list(shapes[key])}, expected {list(shape)} ({dims})")
    return sorted(k for k in shapes if k not in expected)
