"""What a checkpoint is and what rwkv-convert can do with it (the data behind `inspect`)."""

from __future__ import annotations

from .arch import module_for
from .checkpoint import Checkpoint
from .formats.registry import capabilities
from .units import human_size


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
    rows = [
        ("file", f"{info['path']} ({human_size(info['file_size'])})"),
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
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())),
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
    if info["unused_keys"]:
        shown = ", ".join(info["unused_keys"][:4]) + (" ..." if len(info["unused_keys"]) > 4 else "")
        rows.append(("unused keys", f"{len(info['unused_keys'])}: {shown}"))
    rows += [(f"can: {k}", v) for k, v in info["capabilities"].items()]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
