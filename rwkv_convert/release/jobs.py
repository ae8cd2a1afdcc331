"""Release jobs: what each artifact needs (its key, the stamps kept beside it in OUT/.rwkv-release/), building
and verifying it, and running the jobs in this process or in worker processes within a memory budget."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..adapters import AdapterRef
from ..atomic import check_output, protecting, signals_interrupt, write_text_atomic, writing_under
from ..errors import RwkvConvertError
from ..formats.registry import convert, detect, read_checkpoint, writer_for
from ..json_text import json_safe
from ..quality import file_figures
from ..units import memory_available
from ..verify import ReferenceRun, VerifyReport, candidate_run, reference_run, score, verdict_checks
from .spec import PATH_OPTIONS, STAMPS, Artifact, Release, content_digest, digest, release_inputs, runtime_versions

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - Python 3.10
    pass


@dataclass(frozen=True)
class Job:
    """One artifact as a worker gets it (picklable)."""
    artifact: Artifact
    source: str  # the checkpoint's path
    out: str  # the output directory
    key: str  # the build key
    verify_key: str
    tokens: int
    seed: int
    reverify: bool
    quality_bytes: int | None  # None: no quality figures
    n_params: int
    inputs: tuple[str, ...] = ()  # the release file, the sources and option files: no output may land on them
    adapters: tuple[AdapterRef, ...] = ()  # merged into the source (built and verified with them)
    source_hashes: tuple[dict, ...] = ()  # the base's and each adapter's SHA-256, for the report


def plan_jobs(release: Release, artifacts: list[Artifact], out: Path, reverify: bool = False) -> list[Job]:
    """Each artifact's job with its keys; the sources are hashed (once each) and checked against the formats
    here, so that a conversion the format cannot do is bad input before anything is built."""
    specs, digests, hashes = {}, {}, {}
    for a in artifacts:
        if a.source not in specs:
            refs = release.adapters.get(a.source, ())
            try:  # the adapters checked here, too
                ckpt = read_checkpoint(release.sources[a.source], adapters=refs)
            except RwkvConvertError as e:
                raise RwkvConvertError(f"{release.path}: [sources] {a.source}: {e}") from None
            specs[a.source] = ckpt.spec
            hashes[a.source] = ({"path": str(release.sources[a.source]),
                                 "sha256": content_digest(release.sources[a.source])},
                                *({"adapter": str(x.path), "sha256": x.sha256, "kind": x.kind, "alpha": x.alpha,
                                   "scale": x.scale, **({"init": str(x.init), "init_sha256": x.init_sha256}
                                                        if x.init else {})} for x in ckpt.applied_adapters))
            digests[a.source] = digest(hashes[a.source]) if refs else hashes[a.source][0]["sha256"]
        fmt = writer_for(a.to, a.layout)
        opts = fmt.options.build(fmt.target, a.options)
        reason = fmt.supports(specs[a.source]) or (fmt.needs(specs[a.source], opts) if fmt.needs else None)
        if reason:
            raise RwkvConvertError(f"{release.path}: artifact {a.name!r}: cannot convert {a.source} to {fmt.target}:"
                                   f" {reason}")
    if out.exists() and not out.is_dir():
        raise RwkvConvertError(f"--out {out} is a file; give the folder the release goes to")
    with writing_under(out), protecting(out / STAMPS, *release_inputs(release)):
        for a in artifacts:  # every output checked before anything is built or deleted
            try:
                check_output(out / a.output)
            except RwkvConvertError as e:
                raise RwkvConvertError(f"{release.path}: artifact {a.name!r}: {e}") from None
    versions = runtime_versions()
    jobs = []
    for a in artifacts:
        files = {k: content_digest(Path(v)) for k, v in a.options.items()
                 if k in PATH_OPTIONS and isinstance(v, str) and v != "bundled" and Path(v).exists()}
        key = digest({"tool": __version__, "source": digests[a.source], "to": writer_for(a.to, a.layout).target,
                       "options": a.options, "option_files": files, "output": a.output})
        quality = release.quality_bytes if release.quality else None
        verify_key = digest({"build": key, "tokens": release.tokens, "seed": release.seed, "runner": a.runner,
                              "tolerance": a.tolerance, "runtimes": versions, "quality": quality})
        jobs.append(Job(a, str(release.sources[a.source]), str(out), key, verify_key, release.tokens, release.seed,
                        reverify, quality, specs[a.source].n_params, tuple(map(str, release_inputs(release))),
                        release.adapters.get(a.source, ()), hashes[a.source]))
    return jobs


_REFERENCES: dict[tuple, ReferenceRun] = {}  # per process: one reference run per source and stream setting


def _stamp_path(job: Job) -> Path:
    return Path(job.out) / STAMPS / f"{job.artifact.name}.json"


def _read_stamp(path: Path) -> dict | None:
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _files_intact(out: Path, files: dict) -> bool:
    for rel, recorded in files.items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != recorded["bytes"] or content_digest(p) != recorded["sha256"]:
            return False
    return bool(files)


def remove_recorded(out: Path, target: Path, stamp: dict | None) -> None:
    """A stale directory artifact goes before it is written again (an HF directory is written into a new or
    empty one), but only the files this tool recorded writing there: anything else in it is refused."""
    if not target.is_dir() or target.is_symlink():
        return
    check_output(target)
    recorded = set((stamp or {}).get("files", {})) if isinstance((stamp or {}).get("files"), dict) else set()
    found = sorted(target.rglob("*"), reverse=True)  # children before their folders
    foreign = [p for p in found if (p.is_symlink() or not p.is_dir()) and str(p.relative_to(out)) not in recorded]
    if foreign:
        raise RwkvConvertError(f"{target} exists and holds {foreign[-1].relative_to(out)}, which this release did not"
                               " write; move it away (nothing that rwkv-convert did not write is deleted)")
    for p in found:
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink()
    target.rmdir()


def _build(job: Job, out: Path, stamp: dict | None) -> dict:
    a = job.artifact
    target = out / a.output
    with writing_under(out), protecting(out / STAMPS, *map(Path, job.inputs)):
        remove_recorded(out, target, stamp)
        written = convert(job.source, a.to, target, layout=a.layout, adapters=job.adapters, **a.options)
    files = {}
    for p in written:
        for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]):
            files[str(f.relative_to(out))] = {"bytes": f.stat().st_size, "sha256": content_digest(f)}
    return files


def _metrics(report: VerifyReport) -> dict:
    rows = list(report.rows.values())
    return {"max_abs": max(m.max_abs for m in rows), "rel_l2": max(m.rel_l2 for m in rows),
            "kl": max(m.kl for m in rows), "top1": min(m.top1 for m in rows)}


def failure_line(report: VerifyReport) -> str | None:
    """The metric that failed furthest beyond its bound, with its value, bound and stream/mode; None: passed."""
    if report.passed:
        return None
    if "non-finite" in report.worst:
        return report.worst
    row, _, text, _ = max(verdict_checks(report), key=lambda c: c[3])
    return f"{text} ({row})"


def _verify(job: Job, candidate: Path) -> dict:
    fmt, _ = detect(candidate)
    ln0_fold = "package" if fmt.name == "pip" else "fp32"  # pip-converted files hold the package's fold
    key = (job.source, job.adapters, job.tokens, job.seed, ln0_fold)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_run(job.source, job.tokens, job.seed, ln0_fold, adapters=job.adapters)
    ref = _REFERENCES[key]
    run = candidate_run(candidate, ref, None, job.artifact.runner, job.source)
    report = score(ref, run, candidate, job.source, overrides=job.artifact.tolerance)
    tol = report.tolerance
    return {"runtime": report.runner, "note": report.note, "scheme": report.scheme, "passed": report.passed,
            "failure": failure_line(report), "metrics": _metrics(report),
            "tolerance": {"max_abs": tol.max_abs, "rel_l2": tol.rel_l2, "kl": tol.kl, "top1": tol.top1,
                          "reason": tol.reason}}


def _quality(job: Job, candidate: Path) -> dict:
    return file_figures(job.source, candidate, max_bytes=job.quality_bytes, adapters=job.adapters)


def run_job(job: Job, progress: Callable[[str, str], None] = lambda name, what: None) -> dict:
    """Build the artifact unless it is up to date, verify it unless its stored verification still holds, and
    return {"entry": the report entry, "built": bool, "verified": bool}. Errors of this artifact (a missing
    runtime, a failed conversion) become its entry's error, not the release's."""
    a, out = job.artifact, Path(job.out)
    stamp_path = _stamp_path(job)
    stamp = _read_stamp(stamp_path)
    entry = {"name": a.name, "source": a.source, "source_files": list(job.source_hashes),
             "format": writer_for(a.to, a.layout).target,
             "options": {k: (Path(v).name if k in PATH_OPTIONS and isinstance(v, str) else v)
                         for k, v in a.options.items()},
             "output": a.output}
    built = verified = False
    try:
        if not (stamp and stamp.get("key") == job.key and _files_intact(out, stamp.get("files", {}))):
            progress(a.name, "building")
            stamp_path.parent.mkdir(parents=True, exist_ok=True)
            stamp = {"name": a.name, "key": job.key, "tool": __version__, "files": _build(job, out, stamp)}
            write_text_atomic(stamp_path, json.dumps(stamp, indent=1))
            built = True
        files = stamp["files"]
        size = sum(f["bytes"] for f in files.values())
        entry.update(files=[{"path": rel, **f} for rel, f in files.items()], bytes=size,
                     bytes_per_param=size / max(job.n_params, 1))
        done = stamp.get("verification", {})
        # a failure is never kept: each run verifies it again, so a fix anywhere (runtime, tool) shows at once
        if job.reverify or done.get("key") != job.verify_key or not done.get("result", {}).get("passed"):
            progress(a.name, "verifying")
            result = _verify(job, out / a.output)
            if job.quality_bytes is not None:
                progress(a.name, "quality")
                result["quality"] = _quality(job, out / a.output)
            stamp["verification"] = {"key": job.verify_key, "result": json_safe(result)}
            write_text_atomic(stamp_path, json.dumps(stamp, indent=1))
            verified = True
        result = stamp["verification"]["result"]
        entry.update(result)
        entry["status"] = "passed" if result["passed"] else "failed"
    except RwkvConvertError as e:
        entry.update(status="error", failure=str(e))
    return {"entry": entry, "built": built, "verified": verified}


def job_memory(job: Job) -> int:
    """A job's expected peak: the reference and the candidate each hold the model in fp32 at most (the writers
    stream), plus the interpreter with torch and a runtime."""
    return 8 * job.n_params + (512 << 20)


def default_memory_budget() -> int:
    available = memory_available()
    return int(0.75 * available) if available else 4 << 30


_EVENTS = None  # in a worker: the queue its progress events go to the parent by


def _worker_init(events) -> None:
    global _EVENTS
    _EVENTS = events
    # Ctrl-C goes to the whole process group: the parent decides, and stops the workers with SIGTERM (which the
    # atomic writers turn into a clean-up of their temps)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_in_worker(job: Job) -> dict:
    try:
        return run_job(job, lambda name, what: _EVENTS.put((name, what)))
    except KeyboardInterrupt:  # SIGTERM from the parent (atomic.Interrupted): the temps are already gone
        os._exit(128 + signal.SIGTERM)


def _terminate_workers() -> None:
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=30)


def run_jobs(jobs: list[Job], workers: int, max_memory: int, event: Callable[[str, str], None]) -> dict[str, dict]:
    """Every job's result by artifact name. workers 1: in this process, in order. More: worker processes,
    started while the running jobs' expected peaks fit max_memory (a job larger than the budget runs alone)."""
    results: dict[str, dict] = {}
    if workers <= 1:
        with signals_interrupt():
            for job in jobs:
                event(job.artifact.name, "started")
                started = time.monotonic()
                results[job.artifact.name] = {**run_job(job, event), "seconds": time.monotonic() - started}
                event(job.artifact.name, results[job.artifact.name]["entry"]["status"])
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    pending, running = list(jobs), {}
    context = multiprocessing.get_context("spawn")
    events = context.SimpleQueue()  # the workers' stages (building, verifying), shown as they happen
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                               initargs=(events,))
    try:
        with signals_interrupt():
            while pending or running:
                in_use = sum(job_memory(j) for j, _ in running.values())
                while pending and len(running) < workers and (not running or in_use + job_memory(pending[0])
                                                              <= max_memory):
                    job = pending.pop(0)
                    running[pool.submit(_run_in_worker, job)] = (job, time.monotonic())
                    in_use += job_memory(job)
                    event(job.artifact.name, "started")
                done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                while not events.empty():
                    event(*events.get())
                for future in done:
                    job, started = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:  # a worker was killed outright (the kernel's OOM killer, say)
                        raise RwkvConvertError(f"a worker process died while building {job.artifact.name} (out of"
                                               " memory?); rerun with fewer --jobs or a lower --max-memory: finished"
                                               " artifacts are kept") from None
                    results[job.artifact.name] = {**result, "seconds": time.monotonic() - started}
                    event(job.artifact.name, results[job.artifact.name]["entry"]["status"])
    except BaseException:
        _terminate_workers()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results
