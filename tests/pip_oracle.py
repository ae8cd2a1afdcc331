"""Runs the `rwkv` pip package (0.8.32) on fixture files, in its own process (it reads environment
variables at import time and RWKV_V7_ON=1 rebinds its RWKV class, so v7 needs a process of its own).

Usage: python pip_oracle.py JOBS.pt OUT.pt   where JOBS is a list of dicts:
  {"path": str, "strategy": str, "tokens": [int], "split": int, "kind": "run" | "quick" | "convert"}
and OUT gets, per job: "seq" (full_output logits [T, V]), "one" (token-by-token logits [T, V]),
"split" (last logits after tokens[:split] then tokens[split:]), and the final states of each mode.
"quick" jobs only do "seq"; "convert" jobs run the package's converter into job["out"] and report
{"ok": bool, "error": str}. Any job that raises reports {"error": "..."} instead of stopping the run."""

import os
import sys

os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402


def main(jobs_path: str, out_path: str) -> None:
    from rwkv.model import RWKV

    torch.backends.cuda.matmul.allow_tf32 = False
    jobs = torch.load(jobs_path, weights_only=True)
    results = []
    for job in jobs:
        try:
            results.append(run_job(RWKV, job))
        except Exception as e:  # report, so that a test can assert on the package's own failures
            results.append({"error": f"{type(e).__name__}: {e}"})
    torch.save(results, out_path)


def run_job(RWKV, job: dict) -> dict:
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
    tokens = job["tokens"]
    res = {}
    logits, state = model.forward(list(tokens), None, full_output=True)
    res["seq"], res["seq_state"] = logits.float().clone(), [s.clone() for s in state]
    if kind == "quick":
        return res
    state, rows = None, []
    for t in tokens:
        logits, state = model.forward([t], state)
        rows.append(logits.float().clone())
    res["one"], res["one_state"] = torch.stack(rows), [s.clone() for s in state]
    k = job["split"]
    _, state = model.forward(list(tokens[:k]), None)
    logits, state = model.forward(list(tokens[k:]), state)
    res["split"], res["split_state"] = logits.float().clone(), [s.clone() for s in state]
    return res


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
