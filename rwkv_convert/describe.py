"""What a file is and what rwkv-convert can do with it (the data behind `inspect`): original weights in any
format we read, and the files we write for one runtime (pip-converted, prepared, ONNX), read by their runner."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .adapters import AdapterRef, is_adapter, read_adapter
from .arch import module_for
from .checkpoint import Checkpoint, file_sha256
from .errors import RwkvConvertError
from .formats.registry import capabilities, detect, load_detected, read_checkpoint
from .units import human_size


def path_size(path: Path) -> int:
    """A file's bytes, or a directory's (an HF export: its weights, not its config)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def describe_path(path: str | os.PathLike, adapters: Sequence[AdapterRef] = ()) -> dict:
    """describe_checkpoint for original weights (with `adapters` merged: the model they make); for a file made for
    one runtime, what its runner holds: the model's dimensions, the strategy it was made for and its weights'
    schemes. Both with the format, its runtime, the size on disk and, where the format stores types of its own
    (GGUF blocks), those. A fine-tuning adapter file alone: describe_adapter."""
    fmt, probe = detect(path)
    if fmt.name == "pth" and probe.is_torch_file and is_adapter(probe.torch_raw[0]):
        if adapters:
            raise RwkvConvertError(f"{probe.path} is an adapter: inspect it alone, or give the base model with --lora")
        return describe_adapter(probe.path)
    if fmt.read is not None:
        ckpt = read_checkpoint(probe.path, adapters=adapters)
        info = describe_checkpoint(ckpt)
        if ckpt.applied_adapters:
            info["adapters"] = [a.to_dict() for a in ckpt.applied_adapters]
    elif adapters:
        raise RwkvConvertError(f"--lora applies to original weights; {probe.path} ({fmt.summary}) is a converted file")
    else:
        model = load_detected(fmt, probe)
        spec, version = model.spec, module_for(model.spec.version)
        info = {"path": str(probe.path), "architecture": version.DISPLAY_NAMES[spec.version], **spec.to_dict(),
                "strategy": str(model.strategy), "weight_schemes": sorted(model.weight_schemes),
                "capabilities": {"run": f"yes: as made, \"{model.strategy}\"",
                                 "verify": "yes: as the candidate, against the checkpoint it was made from"}}
        if not version.BONUS_FORMS:
            info.pop("bonus_is_log")
    files = fmt.files(probe.path) if fmt.files is not None else [probe.path]
    info.update(format=fmt.summary, runtime=fmt.runtime, file_size=sum(path_size(f) for f in files),
                files=[str(f) for f in files])
    if fmt.types is not None:
        info["stored"] = fmt.types(probe.path)
    return info


def describe_checkpoint(ckpt: Checkpoint) -> dict:
    spec, version = ckpt.spec, module_for(ckpt.spec.version)
    info = {"path": str(ckpt.path), "file_size": ckpt.file_size,
            "architecture": version.DISPLAY_NAMES[spec.version], **spec.to_dict()}
    if not version.BONUS_FORMS:  # only v5.x/v6 have a bonus that may be stored as log(u)
        info.pop("bonus_is_log")
    info["unused_keys"] = ckpt.unused_keys
    info["capabilities"] = capabilities(ckpt)
    return info


def _variant_row(info: dict) -> str:
    dims = info.get("variant_dims", {})
    if info.get("dea"):
        return (f"7b: DeepEmbed (rank {dims['deep_embed']}) + DEA (a causal attention beside each time mix, query"
                f" {dims['dea_query']}, caches {dims['dea_cache']} wide)")
    if info.get("deep_embed"):
        return f"7a: DeepEmbed (a per-token {dims['deep_embed']}x{dims['deep_embed']} matrix modulates each FFN)"
    return "plain"


def format_description(info: dict) -> str:
    if "adapter" in info:
        return format_adapter(info)
    rows = [
        ("file", f"{info['path']} ({human_size(info['file_size'])})"),
        *([("format", info["format"]), ("runtime", info["runtime"])] if "format" in info else []),
        *([("files", ", ".join(Path(f).name for f in info["files"]))] if len(info.get("files", ())) > 1 else []),
        ("architecture", f"{info['architecture']}, version {info['version']}"),
        ("layers", info["n_layer"]), ("n_embd", info["n_embd"]), ("vocab", info["vocab_size"]),
        ("ffn width", info["ffn_dim"]),
    ]
    if info["n_head"]:
        rows.append(("heads", f"{info['n_head']} x head size {info['head_size']}"))
    if info["lora_ranks"]:
        rows.append(("LoRA ranks", ", ".join(f"{k}={v}" for k, v in info["lora_ranks"].items())))
    if info.get("bonus_is_log") is not None:
        rows.append(("bonus", "time_first (log u)" if info["bonus_is_log"] else "time_faaaa (u)"))
    rows += [
        ("parameters", f"{info['n_params']:,} ({info['n_params'] / 1e6:.2f}M)"),
        *([("stored as", ", ".join(f"{k} x{v}" for k, v in info["stored"].items()) + " (the file's own types)")]
          if info.get("stored") else []),
        *([("made for", f"\"{info['strategy']}\" (weights: {', '.join(info['weight_schemes'])})")]
          if "strategy" in info else []),
        *([(("dtypes read back" if info.get("stored") else "dtypes"),
             ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()))] if info["dtypes"] else []),
        ("time_state", "yes (state-tuned)" if info["time_state"] else "no"),
        ("variant", _variant_row(info)),
    ]
    if info["table_params"]:
        share = info["table_params"] / max(info["n_params"], 1)
        rows.append(("per-token tables", f"{info['table_params']:,} parameters ({share:.0%} of the model); one row per"
                     " token is read, the tables stay memory-mapped"))
    if info["dea"]:
        dims = info["variant_dims"]
        rows.append(("state", f"grows with the context: {2 * dims['dea_cache']} fp32 values per layer per token"
                     f" (two {dims['dea_cache']}-wide caches) and the token ids, on top of plain RWKV-7's"))
    if info.get("unused_keys"):
        shown = ", ".join(info["unused_keys"][:4]) + (" ..." if len(info["unused_keys"]) > 4 else "")
        rows.append(("unused keys", f"{len(info['unused_keys'])}: {shown}"))
    for a in info.get("adapters", ()):
        rows.append(("merged", f"{Path(a['path']).name}: {a['kind']}" + (f" rank {a['rank']}" if a["rank"] else "")
                     + f", {a['targets']} weights, {len(a['replaced'])} whole tensors (sha256 {a['sha256'][:12]})"))
    rows += [(f"can: {k}", v) for k, v in info["capabilities"].items()]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def describe_adapter(path: str | Path) -> dict:
    """An adapter file alone, for inspect: its kind, rank, targets, whole tensors, and what a base must have for it
    to fit (its layers; every target's [out, in] where the file fixes it)."""
    adapter = read_adapter(path)
    p = adapter.path
    needs: dict[str, str] = {}
    for target, d in adapter.parts.items():
        if adapter.kind == "lora":
            needs[target] = f"[{d['lora_B'].shape[0]}, {d['lora_A'].shape[1]}]"
        elif d[adapter.kind].dim() == 3:
            t = d[adapter.kind]
            needs[target] = f"[a multiple of {t.shape[-1]}, {t.shape[0] * t.shape[-1]}]"
        else:
            t = d[adapter.kind]
            needs[target] = f"[{t.shape[1]}, at least {t.shape[0]}]"
    needs.update({name: str(list(t.shape)) for name, t in adapter.whole.items()})
    layers = sorted({int(m.group(1)) for n in needs if (m := _LAYER.match(n))})
    kinds = {"lora": "LoRA or PiSSA (lora_A/lora_B: PiSSA when merged with --lora-init; a LoRA needs --lora-alpha)",
             "bone": "Bone (block-affine)", "disha": "DiSHA"}
    ranks = adapter.ranks
    return {"path": str(p), "file_size": p.stat().st_size, "sha256": file_sha256(p), "adapter": adapter.kind,
            "kind": kinds[adapter.kind], "rank": ranks[0] if len(ranks) == 1 else ranks,
            "targets": sorted(adapter.parts), "replaced": sorted(adapter.whole),
            "parameters": sum(t.numel() for d in adapter.parts.values() for t in d.values())
            + sum(t.numel() for t in adapter.whole.values()),
            "fits": {"layers": f"a model of at least {layers[-1] + 1} layers" if layers else "any",
                     "shapes": needs}}


def format_adapter(info: dict) -> str:
    targets = info["targets"]
    kinds = sorted({t.split(".", 2)[-1].removesuffix(".weight") for t in targets})
    rows = [("file", f"{info['path']} ({info['file_size']:,} bytes, sha256 {info['sha256'][:16]})"),
            ("adapter", info["kind"]), ("rank", info["rank"]),
            ("targets", f"{len(targets)} weights ({', '.join(kinds)})"),
            ("replaced", f"{len(info['replaced'])} whole tensors" + (f" ({', '.join(info['replaced'][:4])}"
                                                                       f"{' ...' if len(info['replaced']) > 4 else ''})"
                                                                       if info["replaced"] else "")),
            ("parameters", f"{info['parameters']:,}"),
            ("fits", info["fits"]["layers"] + "; shapes per tensor in --json")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
