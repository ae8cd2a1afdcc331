"""State-tuning files: a learned initial wkv state per layer (`blocks.i.att.time_state`, nothing else) that changes
a base model's behaviour (RWKV-PEFT's state tuning, v5.x, v6 and v7).

Layouts. BlinkDL's files (and the safetensors form written here) store each layer's state [H, N, N] as the
training kernels hold it, [head, value, key]. Applied to a model, it becomes the wkv part of the state: v5/v6
transposed to their [head, key, value] (as the pip package does), v7 as it is (v7's state is [head, value, key]).
The web-rwkv form (web-rwkv, ai00, RWKV-Runner) is what RWKV-Runner's convert_safetensors.py makes of the same
keys: F16 with the last two axes swapped, [head, key, value].

Reading checks the file against the model: the same layer count and [n_head, head_size, head_size] per layer."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import torch

from .atomic import AtomicOutput, protecting
from .checkpoint import Checkpoint, load_raw, tensors_only
from .errors import RwkvConvertError, brief
from .spec import ModelSpec

KEY = "blocks.{}.att.time_state"
_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")
LAYOUTS = ("pth", "safetensors", "web-rwkv")
LAYOUT_TAG = "rwkv_convert.state_layout"  # safetensors metadata: "blinkdl" or "web-rwkv"
STATE_VERSIONS = ("5.0", "5.1", "5.2", "6", "7")


@dataclasses.dataclass
class StateFile:
    path: Path
    layers: list[torch.Tensor]  # per layer [H, N_value, N_key], fp32 in memory (never a view of a file)
    source_dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.layers[0].shape)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise RwkvConvertError(f"{path} is not a readable safetensors file ({brief(e)})") from None


def read_state(path: str | Path) -> StateFile:
    """A state file in any of LAYOUTS (safetensors are told apart by their metadata, else BlinkDL's layout)."""
    p = Path(path)
    if not p.is_file():
        raise RwkvConvertError(f"{p}: no such state file")
    with open(p, "rb") as f:
        head = f.read(8)
    transposed = False
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch zip archive or a legacy pickle
        tensors = tensors_only(p, load_raw(p)[0])
    else:
        tensors, meta = _read_safetensors(p)
        transposed = meta.get(LAYOUT_TAG) == "web-rwkv"
    found: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _KEY.match(name)
        if m is None:
            raise RwkvConvertError(f"{p}: {name} is not part of a state file (it holds only"
                                   " blocks.i.att.time_state); to run a whole model give it as the model, not --state")
        found[int(m.group(1))] = t
    if not found:
        raise RwkvConvertError(f"{p} holds no blocks.i.att.time_state tensors: it is not a state file")
    missing = [i for i in range(len(found) + 1) if i not in found and i <= max(found)]  # never up to a huge index
    if missing:
        raise RwkvConvertError(f"{p}: the state of layer {missing[0]} is missing (it has layers"
                               f" {', '.join(map(str, sorted(found)))})")
    layers = [found[i] for i in range(len(found))]
    bad = next((i for i, t in enumerate(layers) if t.dim() != 3 or t.shape[1] != t.shape[2]
                or t.shape != layers[0].shape or not t.is_floating_point()), None)
    if bad is not None:
        t = layers[bad]
        raise RwkvConvertError(f"{p}: layer {bad}'s time_state is {str(t.dtype).removeprefix('torch.')}"
                               f" {list(t.shape)}; a state file holds one [n_head, head_size, head_size] float"
                               " matrix per layer, the same in every layer")
    dtype = str(layers[0].dtype).removeprefix("torch.")
    layers = [(t.transpose(1, 2) if transposed else t).float().clone().contiguous() for t in layers]
    nonfinite = next((i for i, t in enumerate(layers) if not torch.isfinite(t).all()), None)
    if nonfinite is not None:
        raise RwkvConvertError(f"{p}: layer {nonfinite}'s time_state holds NaN or infinite values; the file is"
                               " damaged or was saved from a diverged run")
    return StateFile(p, layers, dtype)


def check_fits(state: StateFile, spec: ModelSpec, model: str | Path = "the model") -> None:
    if spec.version not in STATE_VERSIONS:
        raise RwkvConvertError(f"{model} is RWKV-{spec.version}, which has no matrix state to tune: state files"
                               " are for RWKV-5.x, 6 and 7")
    want = (spec.n_head, spec.head_size, spec.head_size)
    if len(state.layers) != spec.n_layer or state.shape != want:
        raise RwkvConvertError(
            f"{state.path} is a state of {len(state.layers)} layers of {list(state.shape)}, and {model} needs"
            f" {spec.n_layer} layers of {list(want)} (n_head={spec.n_head}, head_size={spec.head_size}): the state"
            " was tuned for another model")


def with_state(ckpt: Checkpoint, state: StateFile) -> Checkpoint:
    """The checkpoint with this learned initial state in place of any it had: every reader, runner and writer
    then treats it as a state-tuned model."""
    check_fits(state, ckpt.spec, ckpt.path)
    extra = {KEY.format(i): t for i, t in enumerate(state.layers)}
    added = 0 if ckpt.spec.time_state else sum(t.numel() for t in state.layers)  # or it replaces the file's own
    spec = dataclasses.replace(ckpt.spec, time_state=True, n_params=ckpt.spec.n_params + added)
    shapes = {**ckpt.shapes, **{k: tuple(t.shape) for k, t in extra.items()}}
    return dataclasses.replace(ckpt, tensors=ckpt.tensors.with_extra(extra), spec=spec, shapes=shapes,
                               applied_state=state.path)


def apply_state_option(ckpt: Checkpoint, state: str | Path | None) -> Checkpoint:
    return ckpt if state is None else with_state(ckpt, read_state(state))


def convert_state(source: str | Path, layout: str, output: str | Path, spec: ModelSpec | None = None,
                  model: str | Path | None = None) -> tuple[Path, StateFile]:
    """The state-tuning file `source` (any of the three forms) written alone as `layout`; with `spec` (that of
    the base `model`), its shapes checked against it first. Never onto the source or the model."""
    state = read_state(source)
    if spec is not None:
        check_fits(state, spec, model or "the model")
    with protecting(Path(source), *([Path(model)] if model else [])):
        return write_state(state, Path(output), layout, spec), state


def write_state(state: StateFile, output: Path, layout: str, spec: ModelSpec | None = None) -> Path:
    """The state alone, in one of LAYOUTS, atomically. pth and safetensors keep the source's dtype."""
    if layout not in LAYOUTS:
        raise RwkvConvertError(f"unknown state layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    with AtomicOutput(output) as out:
        write_state_to(state, out.temp(), layout, spec)
    return output


def write_state_to(state: StateFile, target: Path, layout: str, spec: ModelSpec | None = None) -> None:
    """The state written at `target` as it is (the caller's atomic temporary file)."""
    dtype = getattr(torch, state.source_dtype) if state.source_dtype in ("float32", "bfloat16", "float16") \
        else torch.float32
    if layout == "web-rwkv":  # F16, [head, key, value]: convert_safetensors.py's swap of the last two axes
        tensors = {KEY.format(i): t.transpose(1, 2).to(torch.float16).contiguous() for i, t in enumerate(state.layers)}
    else:
        tensors = {KEY.format(i): t.to(dtype).contiguous() for i, t in enumerate(state.layers)}
    if layout == "pth":
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        target.write_bytes(buffer.getbuffer())
    else:
        from safetensors.torch import save_file

        meta = {"format": "pt", LAYOUT_TAG: "web-rwkv" if layout == "web-rwkv" else "blinkdl",
                "rwkv_convert.state_of": json.dumps({"n_layer": len(state.layers), "shape": list(state.shape),
                                                     **({"version": spec.version} if spec else {})})}
        save_file(tensors, str(target), metadata=meta)
