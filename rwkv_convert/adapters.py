"""Fine-tuning adapters merged into a base checkpoint as it is read (RWKV-PEFT's LoRA, PiSSA, Bone and DiSHA).

An adapter file is a torch.save'd dict (read like a checkpoint: weights_only, mmap) of, per adapted linear
weight `PREFIX.weight` [out, in]:
- LoRA  `PREFIX.lora_A` [r, in], `PREFIX.lora_B` [out, r]:      W + scale * (alpha / r) * B @ A
- PiSSA the same names, and an init file (`--lora-init`) holding `PREFIX.init_lora_A` / `init_lora_B` (A0, B0):
                                                                 W + scale * (B @ A - B0 @ A0)
- Bone  `PREFIX.bone` [in/r, r, r]: W in r x r blocks Wab,        Wab + scale * (Wab @ bone[b] + bone[b])
- DiSHA `PREFIX.disha`, 3-D as Bone, or 2-D [r, out]:            W[o, k*r + j] + scale * disha[j, o] (and the
  last in % r columns get disha's first rows)
Every other tensor in the file is a trained whole tensor that replaces the base's (W + scale * (T - W)).

LoRA and PiSSA files look alike. PiSSA is what `--lora-init` says; without it a file is a LoRA, which needs its
alpha (`--lora-alpha`, a training argument no file stores). A PiSSA file given as a LoRA is refused all the same:
PiSSA's B @ A starts as W's top singular part, so it points along W (cosine 0.2-0.9 on every target), where a
LoRA's starts at zero and stays nearly orthogonal to W (measured: below 0.05); one target's cosine above
PISSA_COSINE is taken for PiSSA.

Everything is checked against the base's shapes before any data is read: every adapted or replaced name the base
must have, every shape must fit, and a file for another version or size is refused naming its first tensor.
Merging happens when a tensor is read (checkpoint.CheckedTensors edits), so a conversion streams as without an
adapter: the adapter's tensors are held, never a second copy of the model. The merged tensor keeps the base
tensor's dtype (RWKV-PEFT's scripts merge the same way in bf16); the sums are done in fp32."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint, ZipRecordCheck, file_sha256, load_raw, tensors_only
from .errors import RwkvConvertError

KINDS = ("lora", "pissa", "bone", "disha")
PISSA_COSINE = 0.1
_PART = re.compile(r"^(?P<prefix>.+)\.(?P<part>lora_A|lora_B|bone|disha|init_lora_A|init_lora_B)$")
STATE_NAME = re.compile(r"^blocks\.\d+\.att\.time_state$")


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """An adapter as the user names it: the file and the numbers its kind needs."""

    path: Path
    alpha: float | None = None  # LoRA: the training alpha (scaling alpha / r)
    init: Path | None = None  # PiSSA: the init file (init_lora_A / init_lora_B)
    scale: float = 1.0  # the fraction of the fine-tune to apply

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.init is not None:
            object.__setattr__(self, "init", Path(self.init))


@dataclasses.dataclass(frozen=True)
class AppliedAdapter:
    """What was merged: for verdicts, reports and inspect."""

    path: Path
    sha256: str
    kind: str
    rank: int | None
    targets: tuple[str, ...]  # the adapted weights
    replaced: tuple[str, ...]  # whole tensors taken from the file
    alpha: float | None = None
    scale: float = 1.0
    init: Path | None = None
    init_sha256: str | None = None

    def describe(self) -> str:
        parts = [f"{self.kind}" + (f" rank {self.rank}" if self.rank else ""), f"sha256 {self.sha256[:12]}"]
        if self.alpha is not None:
            parts.append(f"alpha {self.alpha:g}")
        if self.init is not None:
            parts.append(f"init {self.init.name} sha256 {self.init_sha256[:12]}")
        if self.scale != 1.0:
            parts.append(f"scale {self.scale:g}")
        return f"{self.path.name} ({', '.join(parts)})"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "kind": self.kind, "rank": self.rank,
                "alpha": self.alpha, "scale": self.scale, "targets": len(self.targets),
                "replaced": list(self.replaced),
                **({"init": str(self.init), "init_sha256": self.init_sha256} if self.init else {})}


@dataclasses.dataclass
class AdapterFile:
    """An adapter file read alone: its adapted weights' tensors by part, and its whole tensors."""

    path: Path
    kind: str  # "lora" (or PiSSA: the same tensors), "bone", "disha"
    parts: dict[str, dict[str, torch.Tensor]]  # target weight name -> {"lora_A": ..., "lora_B": ...} / {"bone": ...}
    whole: dict[str, torch.Tensor]

    @property
    def rank(self) -> int | None:
        ranks = sorted({_rank(self.kind, p) for p in self.parts.values()})
        return ranks[0] if len(ranks) == 1 else None

    @property
    def ranks(self) -> list[int]:
        return sorted({_rank(self.kind, p) for p in self.parts.values()})


def _rank(kind: str, parts: dict[str, torch.Tensor]) -> int:
    if kind == "lora":
        return parts["lora_A"].shape[0]
    t = parts[kind]
    return t.shape[-1] if t.dim() == 3 else t.shape[0]


def _fail(path: Path, what: str) -> RwkvConvertError:
    return RwkvConvertError(f"{path}: {what}")


def _read_tensors(p: Path) -> dict[str, torch.Tensor]:
    """A torch file's tensors (weights_only, mmap), each checked against its zip record's CRC-32 as a checkpoint's
    are: a flipped byte in an adapter would otherwise be merged silently."""
    raw, mmapped = load_raw(p)
    tensors = tensors_only(p, raw)
    if mmapped:
        check = ZipRecordCheck(p, tensors)
        for name, t in tensors.items():
            check(name, t)
    return tensors


def read_adapter(path: str | Path) -> AdapterFile:
    """The adapter file alone, its tensors checked for what an adapter file is (finite floats, paired LoRA
    matrices, square blocks), before any base is read."""
    p = Path(path)
    if not p.is_file():
        raise RwkvConvertError(f"{p}: no such adapter file")
    tensors = _read_tensors(p)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise _fail(p, f"tensor {name} is {str(t.dtype).removeprefix('torch.')}; adapter tensors are floats")
        if not bool(torch.isfinite(t).all()):
            raise _fail(p, f"tensor {name} holds NaN or infinite values; the adapter is damaged or diverged")
        m = _PART.match(name)
        if m is None:
            whole[name] = t
        elif m["part"].startswith("init_"):
            raise _fail(p, f"{name} is a PiSSA init tensor: this is the init file; give it as --lora-init and the"
                        " trained adapter as --lora")
        else:
            parts.setdefault(m["prefix"] + ".weight", {})[m["part"]] = t
    if not parts:
        hint = ("it is a state-tuning file: give it as --state" if whole and all(STATE_NAME.match(k) for k in whole)
                else "a file of whole tensors only is a checkpoint: give it as the model")
        raise _fail(p, f"holds no adapter tensors (lora_A/lora_B, bone, disha): {hint}")
    kinds = {"lora" if "lora_A" in d or "lora_B" in d else next(iter(d)) for d in parts.values()}
    if len(kinds) > 1:
        raise _fail(p, f"mixes adapter kinds ({', '.join(sorted(kinds))}); one file is one fine-tune of one kind")
    kind = kinds.pop()
    state = next((k for k in whole if STATE_NAME.match(k)), None)
    if state:
        raise _fail(p, f"holds a state ({state}) besides the adapter: save the state alone (rwkv-convert"
                    " convert-state) and give it as --state")
    for target, d in parts.items():
        _check_parts(p, target, kind, d)
    return AdapterFile(p, kind, parts, whole)


def _check_parts(p: Path, target: str, kind: str, d: dict[str, torch.Tensor]) -> None:
    prefix = target.removesuffix(".weight")
    if kind == "lora":
        missing = [n for n in ("lora_A", "lora_B") if n not in d]
        if missing:
            raise _fail(p, f"{prefix}.{missing[0]} is missing (a LoRA pairs lora_A [r, in] with lora_B [out, r])")
        a, b = d["lora_A"], d["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise _fail(p, f"{prefix}.lora_A {list(a.shape)} and lora_B {list(b.shape)} do not pair (lora_A is"
                        " [r, in], lora_B [out, r])")
        return
    t = d[kind]
    if t.dim() == 3 and t.shape[1] == t.shape[2]:
        return
    if kind == "disha" and t.dim() == 2:
        return
    shapes = "[blocks, r, r]" + (" or [r, out]" if kind == "disha" else "")
    raise _fail(p, f"{prefix}.{kind} is {list(t.shape)}; a {kind} tensor is {shapes}")


def _fits(kind: str, d: dict[str, torch.Tensor], out: int, inp: int) -> str | None:
    """Why these adapter tensors cannot adapt an [out, in] weight, or None."""
    if kind == "lora":
        a, b = d["lora_A"], d["lora_B"]
        return None if (b.shape[0], a.shape[1]) == (out, inp) else \
            f"lora_B @ lora_A is [{b.shape[0]}, {a.shape[1]}]"
    t = d[kind]
    if t.dim() == 3:
        r = t.shape[-1]
        return None if out % r == 0 and inp % r == 0 and t.shape[0] == inp // r else \
            f"{kind} {list(t.shape)} needs a weight of whole {r}x{r} blocks, {t.shape[0]} of them across"
    return None if t.shape[1] == out and t.shape[0] <= inp else f"disha {list(t.shape)} needs [r <= in, out]"


def _lora_delta(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return d["lora_B"].float() @ d["lora_A"].float()


def _block_delta(w: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Bone (and 3-D DiSHA): each r x r block W[a, b] gains W[a, b] @ blocks[b] + blocks[b]."""
    out, inp = w.shape
    r = blocks.shape[-1]
    wb = w.reshape(out // r, r, inp // r, r).permute(0, 2, 1, 3)  # [a, b, r1, r2]
    delta = wb @ blocks + blocks
    return delta.permute(0, 2, 1, 3).reshape(out, inp)


def _row_delta(w: torch.Tensor, disha: torch.Tensor) -> torch.Tensor:
    """2-D DiSHA [r, out]: column k*r + j of every whole block gains disha[j]; the last in % r columns gain
    disha's first rows."""
    out, inp = w.shape
    r = disha.shape[0]
    whole = inp // r * r
    delta = torch.empty(out, inp)
    delta[:, :whole] = disha.t().repeat(1, inp // r)
    delta[:, whole:] = disha.t()[:, :inp - whole]
    return delta


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na == 0 or nb == 0 else float((a * b).sum()) / (na * nb)


def _read_init(ref: AdapterRef, adapter: AdapterFile) -> dict[str, torch.Tensor]:
    init_path = ref.init
    if not init_path.is_file():
        raise RwkvConvertError(f"{init_path}: no such PiSSA init file")
    tensors = _read_tensors(init_path)
    for target, d in adapter.parts.items():
        prefix = target.removesuffix(".weight")
        for part in ("lora_A", "lora_B"):
            name = f"{prefix}.init_{part}"
            t = tensors.get(name)
            if t is None:
                raise _fail(init_path, f"{name} is missing: this init file is not the one {ref.path.name} was"
                            " trained from")
            if tuple(t.shape) != tuple(d[part].shape) or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise _fail(init_path, f"{name} is {list(t.shape)}, and the adapter's {part} is"
                            f" {list(d[part].shape)}: not the init this adapter was trained from")
    return tensors


Edit = Callable[[torch.Tensor], torch.Tensor]


def _merge(delta_of: Callable[[torch.Tensor], torch.Tensor], scale: float) -> Edit:
    def edit(w: torch.Tensor) -> torch.Tensor:
        w32 = w.float()
        return (w32 + scale * delta_of(w32)).to(w.dtype)
    return edit


def _replace(t: torch.Tensor, scale: float) -> Edit:
    def edit(w: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return t.to(w.dtype).clone()
        w32 = w.float()
        return (w32 + scale * (t.float() - w32)).to(w.dtype)
    return edit


def plan_edits(ckpt: Checkpoint, ref: AdapterRef) -> tuple[dict[str, Edit], AppliedAdapter]:
    """The edits one adapter makes to `ckpt`'s tensors, everything checked against its shapes first."""
    adapter = read_adapter(ref.path)
    src = ckpt.path
    for name, t in adapter.whole.items():
        if name not in ckpt.shapes:
            raise _fail(ref.path, f"{name} is not a tensor of {src.name} (RWKV-{ckpt.spec.variant}): the adapter is"
                        " for another model")
        if tuple(t.shape) != tuple(ckpt.shapes[name]):
            raise _fail(ref.path, f"{name} is {list(t.shape)}, and {src.name} has {list(ckpt.shapes[name])}: the"
                        " adapter is for another model size")
    for target, d in adapter.parts.items():
        shape = ckpt.shapes.get(target)
        first = f"{target.removesuffix('.weight')}.{next(iter(d))}"
        if shape is None or len(shape) != 2:
            raise _fail(ref.path, f"{first} adapts {target}, which {src.name} (RWKV-{ckpt.spec.variant}) has"
                        f" {'not' if shape is None else f'as {list(shape)}, not a matrix'}: the adapter is for"
                        " another model")
        why = _fits(adapter.kind, d, *shape)
        if why:
            raise _fail(ref.path, f"{first}: {why}, and {target} is {list(shape)}: the adapter is for another model"
                        " size")
    if ref.scale != ref.scale or abs(ref.scale) == float("inf"):
        raise RwkvConvertError(f"--lora-scale must be a finite number, not {ref.scale}")
    kind, init = adapter.kind, None
    if kind == "lora" and ref.init is not None:
        if ref.alpha is not None:
            raise RwkvConvertError(f"{ref.path}: --lora-alpha does not apply to a PiSSA adapter (--lora-init given):"
                                   " PiSSA merges B @ A - B0 @ A0 unscaled; drop --lora-alpha")
        kind, init = "pissa", _read_init(ref, adapter)
    elif ref.init is not None:
        raise RwkvConvertError(f"{ref.path} is a {kind} adapter; --lora-init is for PiSSA adapters (lora_A/lora_B)")
    elif kind == "lora" and ref.alpha is None:
        raise RwkvConvertError(f"{ref.path} is a LoRA (rank {adapter.rank or adapter.ranks}): give --lora-alpha, the"
                               " alpha it was trained with (files do not store it: it is the training run's"
                               " --lora_alpha), or --lora-init INIT if it was trained as PiSSA")
    elif kind != "lora" and ref.alpha is not None:
        raise RwkvConvertError(f"{ref.path} is a {kind} adapter, which has no alpha: drop --lora-alpha")
    if kind == "lora":
        target, d = next(iter(adapter.parts.items()))
        cos = _cosine(ckpt.tensors[target].float(), _lora_delta(d))
        ckpt.release(target)
        if abs(cos) > PISSA_COSINE:
            raise RwkvConvertError(
                f"{ref.path} looks like a PiSSA adapter (its B @ A lies along {target}: cosine {cos:.2f}; a LoRA's"
                f" stays below {PISSA_COSINE}): merging it as a LoRA would be wrong - give --lora-init with its init"
                " file (init_pissa.pth / init_lora.pth)")
    edits: dict[str, Edit] = {}
    for target, d in adapter.parts.items():
        edits[target] = _merge(_delta_function(kind, d, ref.alpha, init, target), ref.scale)
    for name, t in adapter.whole.items():
        edits[name] = _replace(t, ref.scale)
    applied = AppliedAdapter(ref.path, file_sha256(ref.path), kind, adapter.rank, tuple(adapter.parts),
                             tuple(adapter.whole), ref.alpha, ref.scale, ref.init,
                             file_sha256(ref.init) if ref.init else None)
    return edits, applied


def _delta_function(kind: str, d: dict[str, torch.Tensor], alpha: float | None, init: dict | None,
                    target: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "lora":
        factor = alpha / d["lora_A"].shape[0]
        return lambda w: factor * _lora_delta(d)
    if kind == "pissa":
        prefix = target.removesuffix(".weight")
        b0, a0 = init[f"{prefix}.init_lora_B"].float(), init[f"{prefix}.init_lora_A"].float()
        return lambda w: _lora_delta(d) - b0 @ a0
    t = d[kind].float()
    return (lambda w: _block_delta(w, t)) if t.dim() == 3 else (lambda w: _row_delta(w, t))


def with_adapters(ckpt: Checkpoint, refs: Sequence[AdapterRef]) -> Checkpoint:
    """The checkpoint with these adapters merged in order (each checked against the base's shapes before any is
    applied); a merged tensor is made when it is read."""
    if not refs:
        return ckpt
    for ref in refs:
        edits, applied = plan_edits(ckpt, ref)
        ckpt = dataclasses.replace(ckpt, tensors=ckpt.tensors.with_edits(edits),
                                   applied_adapters=(*ckpt.applied_adapters, applied))
    return ckpt


def adapter_inputs(ckpt: Checkpoint) -> list[Path]:
    """The adapter files (and PiSSA init files) merged into ckpt: inputs nothing may be written onto."""
    return [p for a in ckpt.applied_adapters for p in (a.path, a.init) if p is not None]


def adapter_refs(loras: Sequence[str], alphas: Sequence[str], inits: Sequence[str],
                 scales: Sequence[float]) -> tuple[AdapterRef, ...]:
    """--lora FILE (repeatable, applied in order) with --lora-alpha / --lora-init / --lora-scale each given once
    (for every --lora) or once per --lora, in the same order ("none": that adapter has none)."""
    if not loras:
        given = [flag for flag, values in (("--lora-alpha", alphas), ("--lora-init", inits),
                                           ("--lora-scale", scales)) if values]
        if given:
            raise RwkvConvertError(f"{given[0]} applies to an adapter: give it with --lora FILE")
        return ()

    def per_adapter(flag: str, values: Sequence, default):
        if not values:
            return [default] * len(loras)
        if len(values) == 1:
            return list(values) * len(loras)
        if len(values) != len(loras):
            raise RwkvConvertError(f"{flag} is given {len(values)} times for {len(loras)} --lora: give it once (for"
                                   " all) or once per --lora, in the same order (none where one has none)")
        return list(values)

    def number(flag: str, value) -> float | None:
        if value is None or str(value).lower() == "none":
            return None
        try:
            x = float(value)
        except ValueError:
            raise RwkvConvertError(f"{flag} takes a number (or none), not {value!r}") from None
        if not x == x or abs(x) == float("inf") or (flag == "--lora-alpha" and x <= 0):
            raise RwkvConvertError(f"{flag} takes a finite number{' above 0' if flag == '--lora-alpha' else ''},"
                                   f" not {value!r}")
        return x

    refs = []
    for path, alpha, init, scale in zip(loras, per_adapter("--lora-alpha", alphas, None),
                                        per_adapter("--lora-init", inits, None),
                                        per_adapter("--lora-scale", scales, 1.0), strict=True):
        init = None if init is None or str(init).lower() == "none" else Path(init)
        refs.append(AdapterRef(Path(path), number("--lora-alpha", alpha), init, number("--lora-scale", scale)))
    return tuple(refs)


def is_adapter(tensor_names) -> bool:
    """Whether a torch file's names are an adapter's (any lora_A/lora_B/bone/disha/init tensor)."""
    return any(_PART.match(n) for n in tensor_names if isinstance(n, str))
