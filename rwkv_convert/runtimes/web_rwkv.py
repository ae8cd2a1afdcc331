"""Running web-rwkv `.st` files in web-rwkv itself: web-rwkv-py, the Python binding of the web-rwkv 0.8 engine
that ai00 and RWKV-Runner's WebGPU mode run, on any Vulkan device (on a machine without a GPU, Mesa's lavapipe).
It runs in a process of its own: the engine panics on a file it misreads (a Rust PanicException, or an abort),
and that must be a failed verification with its message, not our crash.

What web-rwkv-py 0.2.3 gives (measured): a call returns the last token's logits (`run_full` too), and the state
is not carried from one call to the next (a second call's logits are neither the continued stream's nor a fresh
one's); within one call the engine feeds the tokens in chunks of `token_chunk_size` with the state carried. So
the logits at position p of a mode are one call from a fresh state on tokens[:p + 1]: chunks of 128 for "seq"
(every position), of 1 for "one" (a step per token, the state carried p times) and of `split` for "split" (the
state carried across each chunk), those two at a few positions spread over the stream (ONE_POSITIONS).

Client: `run_in_web_rwkv(path, streams, split)` -> {stream: {"seq": [T, V], "one": [P, V], "split": [P, V]}},
with the positions of "one" and "split" from `mode_positions`; a failure of the engine raises ClientFailed."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..client_files import client_environment, client_view
from .base import Client, ClientFailed, NoClient

PIN = "web-rwkv-py==0.2.3"
VULKAN = ("web-rwkv needs a Vulkan driver (without a GPU, Mesa's lavapipe: apt-get install mesa-vulkan-drivers"
          " libvulkan1)")
CLIENT = Client("web-rwkv (web-rwkv-py)", "web-rwkv-py", "web_rwkv_py",
                "runs web-rwkv .st files in web-rwkv, the engine of ai00 and RWKV-Runner (verify)",
                f"pip install {PIN}; {VULKAN}")
VERSIONS = ("4", "5.1", "5.2", "6")  # what web-rwkv 0.8 runs (its V4, V5 and V6; 5.1 written as 5.2 is)
# Shapes web-rwkv 0.8 (web-rwkv-py 0.2.3) runs, measured on v6 models of random weights: fewer than 4 layers
# panic; an n_embd other than a multiple of 128 (64, 96, 192, 320) or a vocabulary other than a multiple of 4 (301,
# 302) give wrong logits (KL 0.003-1.6) where 128, 256 and 300, 304 agree. Later web-rwkv pads the vocabulary
# (num_vocab_padded), so the files are not refused: these are only not checked in this client.
MIN_LAYERS, EMBD_MULTIPLE, VOCAB_MULTIPLE = 4, 128, 4
ONE_POSITIONS = 8  # positions of the step-by-step and chunked modes (each a call of up to T steps)
SEQ_CHUNK = 128  # web-rwkv-py's own default


def out_of_reach(spec) -> str | None:
    """Why web-rwkv-py 0.2.3 cannot check this model (see above), or None."""
    if spec.n_layer < MIN_LAYERS:
        return f"{PIN} panics on fewer than {MIN_LAYERS} layers (this model has {spec.n_layer})"
    if spec.n_embd % EMBD_MULTIPLE:
        return f"{PIN} computes n_embd in multiples of {EMBD_MULTIPLE} only (this model has {spec.n_embd})"
    if spec.vocab_size % VOCAB_MULTIPLE:
        return f"{PIN} computes vocabularies of a multiple of {VOCAB_MULTIPLE} only (this model has {spec.vocab_size})"
    return None


def mode_positions(tokens: int, split: int) -> list[int]:
    """The positions "one" and "split" are read at: spread over the stream, with both sides of the split and
    the last."""
    spread = {round(k * (tokens - 1) / (ONE_POSITIONS - 1)) for k in range(ONE_POSITIONS)}
    return sorted(spread | {max(split - 1, 0), min(split, tokens - 1), tokens - 1})


def run_in_web_rwkv(path: Path, streams: dict[str, list[int]], split: int, timeout: float = 3600) -> dict:
    with tempfile.TemporaryDirectory(prefix="rwkv-convert-web-rwkv-") as tmp, \
            client_view({"model.st": Path(path)}) as view:
        job, out = Path(tmp) / "job.pt", Path(tmp) / "out.pt"
        torch.save({"path": str(view.path("model.st")), "streams": streams, "split": split}, job)
        # one lavapipe thread: its thread split changes the order of float sums, and so the last digits
        env = client_environment() | {"LP_NUM_THREADS": "1", "XDG_RUNTIME_DIR": tmp}
        try:
            proc = subprocess.run([sys.executable, "-m", __name__, str(job), str(out)], env=env,
                                  capture_output=True, text=True, timeout=timeout, pass_fds=view.fds)
        except subprocess.TimeoutExpired:
            raise ClientFailed(f"web-rwkv did not finish in {timeout:g} s") from None
        if proc.returncode or not out.is_file():
            raise ClientFailed(f"web-rwkv failed: {_last_line(proc)}")
        result = torch.load(out, weights_only=True)
    if "no_client" in result:
        raise NoClient(f"{result['no_client']}; {VULKAN}")
    if "error" in result:
        raise ClientFailed(f"web-rwkv failed: {result['error']}")
    return result


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else f"exit code {proc.returncode}"


def _logits(model, tokens: list[int], chunk: int) -> torch.Tensor:
    model.clear_state()
    return torch.tensor(model.run(tokens, chunk), dtype=torch.float32)


def _open(path: str):
    """The model in web-rwkv, or {"no_client": why} where web-rwkv cannot start here at all."""
    try:
        import web_rwkv_py
    except ImportError as e:  # e.g. the Vulkan loader library is missing
        return {"no_client": f"web-rwkv-py could not be imported ({e})"}
    try:
        return web_rwkv_py.Model(path)
    except ValueError as e:
        if "device" in str(e) or "adapter" in str(e):  # "failed to request device": no Vulkan driver
            return {"no_client": f"web-rwkv found no Vulkan device ({e})"}
        raise


def _run(job: dict) -> dict:
    model = _open(job["path"])
    if isinstance(model, dict):
        return model
    split, results = job["split"], {}
    for name, tokens in job["streams"].items():
        positions = mode_positions(len(tokens), split)
        results[name] = {
            "seq": torch.stack([_logits(model, tokens[:p + 1], SEQ_CHUNK) for p in range(len(tokens))]),
            "one": torch.stack([_logits(model, tokens[:p + 1], 1) for p in positions]),
            "split": torch.stack([_logits(model, tokens[:p + 1], split) for p in positions])}
    return results


def main(job_path: str, out_path: str) -> None:
    job = torch.load(job_path, weights_only=True)
    try:
        result = _run(job)
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]}
    torch.save(result, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
