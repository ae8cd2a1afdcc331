"""The web-rwkv / ai00 / RWKV-Runner safetensors layout (`.st`), as RWKV-Runner's convert_safetensors.py
writes it: the raw .pth values, every tensor F16, names renamed (time_faaaa -> time_first, time_maa ->
time_mix, lora_A/B -> lora.0/1) then lower-cased, the last two dims swapped for the first of TRANSPOSED
that the new name contains, and for 5.1 the per-head time_decay and bonus [H] expanded to [H, C/H]. web-rwkv reads
every v5 file as 5.2: a 5.1 bonus stored in log form (time_first) is written exp'd, as 5.2's u; 5.0 (no gate) it
cannot run. No ln0 fold, no rescale, no decay exp: web-rwkv does those at load. Metadata {"format": "pt"}.
runtimes/web_rwkv.py runs the files in web-rwkv itself (verify)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import AtomicOutput
from ..checkpoint import Checkpoint, checkpoint_from_tensors
from ..errors import RwkvConvertError
from ..runtimes.base import ClientRun, NoClient
from ..runtimes.web_rwkv import CLIENT as WEB_RWKV
from ..runtimes.web_rwkv import PIN as WEB_RWKV_PIN
from ..runtimes.web_rwkv import VERSIONS as CLIENT_VERSIONS
from ..runtimes.web_rwkv import mode_positions, out_of_reach, run_in_web_rwkv
from ..spec import ModelSpec
from ..state_file import KEY, StateFile, read_state, with_state, write_state_to
from .base import Format, Options, Probe, option, per_token_tables_refusal
from .safetensors_io import SafetensorsWriter, read_safetensors

RENAMES = (("time_faaaa", "time_first"), ("time_maa", "time_mix"), ("lora_A", "lora.0"), ("lora_B", "lora.1"))
TRANSPOSED = ("time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2", "w1", "w2", "a1", "a2", "g1", "g2",
              "v1", "v2", "time_state", "lora.0")
LAYOUT_KEY = "rwkv_convert.layout"  # our own extra metadata: lets our reader undo every rule exactly
STATE_KEY = "rwkv_convert.state_file"  # a state-tuned model's state file, beside it (write)
STATE_SUFFIX = "-state.st"


def web_rwkv_name(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name.lower()


def is_transposed(web_name: str) -> bool:
    return any(pattern in web_name for pattern in TRANSPOSED)


def to_web_rwkv(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor]:
    new = web_rwkv_name(name)
    # RWKV-Runner's own rule names the version: 5.1's per-head decay and bonus are stored per channel
    per_head = spec.version == "5.1"  # a rule of this name table, keyed by version as RWKV-Runner keys it
    if name.endswith("att.time_first") and spec.bonus_is_log:
        t = t.float().exp()  # web-rwkv reads every v5 bonus as 5.2's u: a 5.1 log-form one, exp'd (5.0: refused)
    if per_head and name.endswith(("att.time_decay", "att.time_faaaa", "att.time_first")) and t.dim() == 1:
        t = t.reshape(-1, 1).expand(-1, spec.head_size)
    if is_transposed(new) and t.dim() >= 2:
        t = t.transpose(-2, -1)
    return new, t.to(torch.float16).contiguous()


def metadata(spec) -> dict[str, str]:
    return {"format": "pt", LAYOUT_KEY: "web-rwkv", "rwkv_convert.version": spec.version, "rwkv_convert.bonus": "u"}


def looks_like_web_rwkv(shapes: dict[str, tuple[int, ...]], meta: dict) -> bool:
    """Ours say so; others (metadata {"format": "pt"} like any safetensors) are told from BlinkDL-keyed files
    by what the rules change: v6's time_mix_x, v5.2's [H, N] time_first, v7's transposed LoRAs."""
    if meta.get(LAYOUT_KEY) == "web-rwkv":
        return True
    if "blocks.0.att.time_mix_x" in shapes:
        return True
    first = shapes.get("blocks.0.att.time_first")
    if first is not None and len(first) == 2 and "blocks.0.att.ln_x.weight" in shapes:
        return True
    w1, ln1 = shapes.get("blocks.0.att.w1"), shapes.get("blocks.0.ln1.weight")
    return w1 is not None and ln1 is not None and w1[0] != ln1[0]


def from_web_rwkv(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """BlinkDL names and shapes back from a web-rwkv file (the values stay F16 views of the file).
    The bonus: v6 and 2-D (5.2, or 5.1 expanded) time_first were time_faaaa (u); 1-D ones are 5.0/5.1's log u.
    Ours record it (and 5.1's expansion, undone); a foreign expanded 5.1 runs as 5.2, which is the same math."""
    v6 = "blocks.0.att.time_mix_x" in tensors
    v5 = "blocks.0.att.ln_x.weight" in tensors and not v6 and "blocks.0.att.r_k" not in tensors
    ours = "rwkv_convert.bonus" in meta
    first = tensors.get("blocks.0.att.time_first")
    bonus_is_log = meta["rwkv_convert.bonus"] == "log" if ours else (first is not None and first.dim() == 1)
    squeeze = v5 and (meta.get("rwkv_convert.version") == "5.1" or (not ours and bonus_is_log))
    out = {}
    for name, t in tensors.items():
        if is_transposed(name) and t.dim() >= 2:
            t = t.transpose(-2, -1)
        if v6:
            name = name.replace(".time_mix_", ".time_maa_")
        if name.endswith("att.time_first") and (v6 or (v5 and not bonus_is_log)):
            name = name[: -len("time_first")] + "time_faaaa"
        if squeeze and t.dim() == 2 and name.endswith(("att.time_decay", "att.time_faaaa", "att.time_first")):
            t = t[:, 0]  # the 5.1 expansion [H] -> [H, C/H], undone
        out[name] = t
    return out


@dataclass(frozen=True)
class WebRwkvOptions(Options):
    dtype: str = option("fp16", "the tensors' type: web-rwkv's loader accepts only F16")

    def __post_init__(self) -> None:
        if self.dtype != "fp16":
            raise RwkvConvertError(f"web-rwkv's loader accepts only F16 tensors: drop --dtype {self.dtype} (or use"
                                   " --to hf or --to prepared)")


def state_path_for(output: Path) -> Path:
    """Where the state of a state-tuned model goes: beside the model, as ai00 and RWKV-Runner take it."""
    return output.with_name(f"{output.stem}{STATE_SUFFIX}")


def write(ckpt: Checkpoint, output: Path, options: WebRwkvOptions) -> list[Path]:
    """The model as a .st; a learned initial state (state-tuned, or --state) as a state file of its own beside it
    (web-rwkv reads state only from such a file: in the model file it would be ignored without a word)."""
    states = [KEY.format(i) for i in range(ckpt.spec.n_layer)] if ckpt.spec.time_state else []
    state_out = state_path_for(output) if states else None
    meta = metadata(ckpt.spec) | ({STATE_KEY: state_out.name} if state_out else {})
    with AtomicOutput(output) as target, contextlib.ExitStack() as stack:
        if state_out:  # written (and committed) with the model: both or neither
            state_target = stack.enter_context(AtomicOutput(state_out))
            layers = [ckpt.tensors[name].float().clone() for name in states]
            write_state_to(StateFile(state_out, layers, "float16"), state_target.temp(), "web-rwkv", ckpt.spec)
        writer = SafetensorsWriter(target.temp())
        try:
            for name, t in ckpt.tensors.items():
                if name not in states:
                    writer.add(*to_web_rwkv(name, t, ckpt.spec))
                ckpt.release(name)
            writer.close(meta)
        finally:
            writer.abort()
    return [output, *([state_out] if state_out else [])]


def sniff(probe: Probe) -> bool:
    header = probe.safetensors_header
    return header is not None and looks_like_web_rwkv(*header)


def read(probe: Probe) -> Checkpoint:
    tensors, meta = read_safetensors(probe.path)
    ckpt = checkpoint_from_tensors(probe.path, from_web_rwkv(tensors, meta), mmapped=True)
    state = state_file_of(probe.path, meta)
    return with_state(ckpt, read_state(state)) if state else ckpt


def state_file_of(path: Path, meta: dict) -> Path | None:
    """The state file a .st of ours names (beside it, by a plain name), or None for a model without one."""
    name = meta.get(STATE_KEY)
    if name is None:
        return None
    if Path(name).name != name or not name.endswith(STATE_SUFFIX):
        raise RwkvConvertError(f"{path} names its state file {name!r}, which is not a file name of ours beside it")
    state = path.parent / name
    if not state.is_file():
        raise RwkvConvertError(f"{path} is a state-tuned model whose state is in {name}, which is not beside it:"
                               " copy it there too (web-rwkv and ai00 load the state from it)")
    return state


def files(path: Path) -> list[Path]:
    """The model and the state file it names, where that is there (inspect lists both)."""
    header = Probe(path).safetensors_header
    name = header[1].get(STATE_KEY) if header else None
    state = path.parent / name if name and Path(name).name == name else None
    return [path, *([state] if state is not None and state.is_file() else [])]


def supports(spec: ModelSpec) -> str | None:
    if spec.version == "5.0":  # measured: web-rwkv 0.8 panics on it
        return ("web-rwkv has no RWKV-5.0: its attention has no gate, and web-rwkv's loader takes a gateless file for"
                " RWKV-4; use --to onnx, --to prepared or --to pip")
    return per_token_tables_refusal(spec, "web-rwkv")


def client_run(path: Path, strategy: str | None, streams: dict[str, list[int]], split: int,
               spec: ModelSpec) -> ClientRun:
    """Runs the file in web-rwkv (web-rwkv-py, in a process of its own: runtimes/web_rwkv.py)."""
    if strategy:
        raise RwkvConvertError("a web-rwkv file runs in web-rwkv as it is: drop --strategy (or use --runner ours)")
    if spec.version not in CLIENT_VERSIONS:
        raise NoClient(f"{WEB_RWKV_PIN} runs RWKV-{', '.join(CLIENT_VERSIONS)}, not RWKV-{spec.variant}")
    if out_of_reach(spec):
        raise NoClient(out_of_reach(spec))
    if spec.time_state:
        # measured: the binding cannot make a State from numbers, and the state it carries from call to call
        # does not continue the stream (docs/safetensors.md), so a state loaded through it could not be judged
        raise NoClient(f"{WEB_RWKV_PIN} has no way to load a state file (web-rwkv and ai00 load it; this binding"
                       " does not), so the model and its state file ran in our reader")
    WEB_RWKV.check_installed()
    read_safetensors(path)  # our checksums first: web-rwkv would run altered data as it is
    outputs = run_in_web_rwkv(path, streams, split)
    positions = {key: mode_positions(len(next(iter(streams.values()))), split) for key in ("one", "split")}
    return ClientRun(WEB_RWKV.name, "fp16", outputs, {"fp16"}, positions=positions)


FORMAT = Format(
    name="web-rwkv", family="safetensors", summary="a web-rwkv / ai00 / RWKV-Runner .st file (F16)",
    runtime="web-rwkv, ai00 and RWKV-Runner", sniff=sniff, read=read, write=write, options=WebRwkvOptions,
    supports=supports, client_run=client_run, files=files)
