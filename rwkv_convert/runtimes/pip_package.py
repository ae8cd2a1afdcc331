"""Running files in the `rwkv` pip package (the runtime its converted `.pth` files are made for), in a
separate process: the package reads environment variables at import time, turns TF32 on globally, and
`RWKV_V7_ON=1` rebinds its RWKV class, so v7 needs a process of its own (and DeepEmbed, RWKV_DE_VERSION=1,
another).

Client: `run_in_pip_package(jobs, v7=False)`. Each job is a dict:
  {"kind": "run" | "quick" | "convert", "path": str, "strategy": str, "tokens": [int], "split": int, "out": str}
"run" returns "seq" (full_output logits [T, V] of one call), "one" (token by token, [T, V]) and "split"
(tokens[:split] then tokens[split:] with the state carried, full_output of both, [T, V]), each with its
final state ("seq_state", ...); "quick" returns only "seq"; "convert" runs the package's own converter into
job["out"]. A job that raises returns {"error": "Type: message"}."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..client_files import client_environment, client_view
from ..errors import RwkvConvertError
from .base import Client

CLIENT = Client("rwkv pip package", "rwkv", "rwkv", "the pip package: runs --to pip files, the numerical oracle",
                "pip install rwkv")


def run_in_pip_package(jobs: list[dict], v7: bool = False, timeout: float = 3600,
                       deep_embed: bool = False) -> list[dict]:
    """deep_embed: run RWKV-7 DeepEmbed ("7a") files (the package's RWKV_DE_VERSION=1, read at import)."""
    if not jobs:
        return []
    # the package appends ".pth" to a name and strips its spaces: it gets our names for the files, never the user's
    # (a file an earlier "convert" job of the batch writes is the package's own output, read where it lands)
    made = {job["out"] for job in jobs if job.get("kind") == "convert"}
    names = {path: f"model{k}.pth" for k, path in enumerate(dict.fromkeys(job["path"] for job in jobs))
             if path not in made}
    with tempfile.TemporaryDirectory(prefix="rwkv-convert-pip-") as tmp, \
            client_view({name: Path(path) for path, name in names.items()}) as view:
        jobs_file, out_file = Path(tmp) / "jobs.pt", Path(tmp) / "out.pt"
        torch.save([job | {"path": str(view.path(names[job["path"]]))} if job["path"] in names else job
                    for job in jobs], jobs_file)
        env = {k: v for k, v in client_environment().items() if not k.startswith("RWKV_")}
        env.update({"RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"})
        if v7 or deep_embed:
            env["RWKV_V7_ON"] = "1"
        if deep_embed:
            env["RWKV_DE_VERSION"] = "1"
        proc = subprocess.run([sys.executable, "-m", __name__, str(jobs_file), str(out_file)], env=env,
                              capture_output=True, text=True, timeout=timeout, pass_fds=view.fds)
        if proc.returncode:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
            raise RwkvConvertError(f"the rwkv pip package failed: {last[:300]}")
        return torch.load(out_file, weights_only=True)


def _run_job(RWKV, job: dict) -> dict:
    path, kind = job["path"], job.get("kind", "run")
    if kind == "convert":
        try:
            RWKV(path, strategy=job["strategy"], verbose=False, convert_and_save_and_exit=job["out"])
        except SystemExit:  # the package calls exit(0) after saving
            pass
        return {"ok": True}
    if os.environ.get("RWKV_V7_ON") == "1":  # the v7 class appends ".pth" itself and has no verbose flag
        model = RWKV(path.removesuffix(".pth"), strategy=job["strategy"])
    else:
        model = RWKV(path, strategy=job["strategy"], verbose=False)
    tokens = list(job["tokens"])

    def full(chunk, state):
        logits, state = model.forward(list(chunk), state, full_output=True)
        logits = logits.float().clone()
        return (logits if logits.dim() == 2 else logits.unsqueeze(0)), state

    res = {}
    logits, state = full(tokens, None)
    res["seq"], res["seq_state"] = logits, [s.clone() for s in state]
    if kind == "quick":
        return res
    state, rows = None, []
    for t in tokens:
        logits, state = model.forward([t], state)
        rows.append(logits.float().clone())
    res["one"], res["one_state"] = torch.stack(rows), [s.clone() for s in state]
    k = job["split"]
    first, state = full(tokens[:k], None)
    second, state = full(tokens[k:], state)
    res["split"], res["split_state"] = torch.cat([first, second]), [s.clone() for s in state]
    return res


def _weights_only(load):
    """torch.load as the package calls it (no weights_only), made to refuse pickled code whatever it is told."""
    def load_weights_only(*args, **kwargs):
        kwargs["weights_only"] = True
        return load(*args, **kwargs)
    return load_weights_only


def main(jobs_path: str, out_path: str) -> None:
    torch.load = _weights_only(torch.load)  # before the package binds anything (it calls torch.load by attribute)
    from rwkv.model import RWKV

    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for job in torch.load(jobs_path, weights_only=True):
        try:
            results.append(_run_job(RWKV, job))
        except Exception as e:  # reported, so that callers can show (or tests assert on) the package's failures
            results.append({"error": f"{type(e).__name__}: {e}"})
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
