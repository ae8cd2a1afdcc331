"""Release matrices: a TOML file lists source checkpoints and the artifacts to build from them; `release`
builds the ones that are not up to date, verifies each in its runtime (verify.py), and writes a JSON report,
a JUnit XML report and a Markdown summary (docs/ci.md).

Up to date means: the key stored beside the artifact (OUT/.rwkv-release/NAME.json: a hash of the source's
bytes, the format and its options, any file an option names, and this tool's version) is the one this run
computes, and every file it records still has its size and SHA-256. A copied-in, truncated or edited artifact
is rebuilt; an up-to-date one keeps its stored verification as long as the verification's own key (tokens,
seed, runner, tolerance, the runtimes' versions) is unchanged.

Jobs run in this process (--jobs 1) or in worker processes started within a memory budget. Every file is
written atomically (atomic.py), so an interrupt leaves whole artifacts or none; a rerun finishes the rest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .atomic import check_output, protecting, signals_interrupt, write_text_atomic, writing_under
from .bundled import BUNDLED_PREFIX, model_path
from .errors import RwkvConvertError
from .formats.base import flag_of
from .formats.prepared import file_sha256
from .formats.registry import convert, detect, read_checkpoint, writer_for
from .quality import file_figures
from .runtimes.base import installed_version
from .units import human_size, memory_available
from .verify import ReferenceRun, VerifyReport, candidate_run, reference_run, score, verdict_checks

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPORT_NAME = "release-report"
STAMPS = ".rwkv-release"  # the keys and verifications, one JSON file per artifact, inside --out
# the output name an artifact gets when the release file gives none: NAME + this
SUFFIXES = {"pip": ".pth", "gguf": ".gguf", "onnx": ".onnx", "web-rwkv": ".st", "prepared": ".safetensors", "hf": ""}
PATH_OPTIONS = ("tokenizer", "calibration")  # options that name a file: its bytes are part of the key
TOLERANCE_KEYS = ("max_abs", "rel_l2", "kl", "top1")
ARTIFACT_KEYS = ("name", "source", "to", "layout", "output", "runner", "tolerance")
RELEASE_KEYS = ("title", "tokens", "seed", "quality", "quality_bytes")
RUNTIME_PACKAGES = ("torch", "rwkv", "onnxruntime", "llama_cpp_python", "transformers", "rwkv7-hf")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Artifact:
    name: str
    source: str  # a key of Release.sources
    to: str
    layout: str | None
    options: dict  # the format's option names -> values (file options resolved to absolute paths)
    output: str  # relative to the output directory
    runner: str = "native"
    tolerance: dict = field(default_factory=dict)  # overrides: TOLERANCE_KEYS -> bound


@dataclass(frozen=True)
class Release:
    path: Path
    digest: str  # SHA-256 of the release file: merged reports must come from one file
    title: str
    sources: dict[str, Path]
    artifacts: list[Artifact]
    tokens: int = 64
    seed: int = 0
    quality: bool = False
    quality_bytes: int = 16384


def bundled_release() -> Path:
    """The release file of the bundled trained model (the README's main job)."""
    return Path(__file__).with_name("trained") / "release.toml"


def _fail(path: Path, where: str, what: str) -> RwkvConvertError:
    return RwkvConvertError(f"{path}: {where}{what}")


def _source_path(path: Path, value) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(path, "", f"a source must be a path (string), not {value!r}")
    if value.startswith(BUNDLED_PREFIX):
        try:
            return model_path(value)
        except RwkvConvertError as e:
            raise _fail(path, "", str(e)) from None
    return (path.parent / value).resolve()


def _format_options(path: Path, where: str, to: str, layout, given: dict) -> dict:
    """The artifact's format options under the format's option names; `quant` and `onnx-quant` (the CLI flag
    without its dashes) both work."""
    fmt = writer_for(to, layout)
    fields = dataclasses.fields(fmt.options)
    by_key = {}
    for f in fields:
        by_key[f.name] = f.name
        by_key[flag_of(f).split("/")[0].removeprefix("--")] = f.name
    options = {}
    for key, value in given.items():
        name = by_key.get(key, by_key.get(key.replace("_", "-")))
        if name is None:
            takes = ", ".join(f.name for f in fields) or "no options"
            raise _fail(path, where, f"{key!r} is not a key of an artifact nor an option of --to {fmt.target}"
                        f" (artifact keys: {', '.join(ARTIFACT_KEYS)}; its options: {takes})")
        if name in PATH_OPTIONS and isinstance(value, str) and value != "bundled":
            value = str((path.parent / value).resolve())
        options[name] = value
    try:
        fmt.options.build(fmt.target, options)  # choices are checked here, before anything is built
    except RwkvConvertError as e:
        raise _fail(path, where, str(e)) from None
    return options


def parse_release(path: str | os.PathLike) -> Release:
    """The release file, checked whole (every artifact's format and options) before anything is built."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RwkvConvertError(f"cannot read the release file {path}: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise RwkvConvertError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"release", "sources", "artifact"})
    if unknown:
        raise _fail(path, "", f"unknown table {', '.join(unknown)}; a release file has [release], [sources] and"
                    " [[artifact]] entries")
    settings = doc.get("release", {})
    for table, kind, example in (("release", dict, "[release]"), ("sources", dict, '[sources] v7 = "model.pth"'),
                                 ("artifact", list, '[[artifact]] to = "gguf"')):
        if table in doc and not isinstance(doc[table], kind):
            raise _fail(path, "", f"{table} is a {type(doc[table]).__name__}, not a table: write {example}")
    bad = sorted(set(settings) - set(RELEASE_KEYS))
    if bad:
        raise _fail(path, "[release]: ", f"unknown key {', '.join(bad)}; use {', '.join(RELEASE_KEYS)}")
    sources = {name: _source_path(path, value) for name, value in doc.get("sources", {}).items()}
    if not sources:
        raise _fail(path, "", "no [sources]: name at least one checkpoint, e.g. v7 = \"RWKV-x070.pth\"")
    entries = doc.get("artifact", [])
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "", "no [[artifact]] entries: nothing to build")
    artifacts, seen = [], set()
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise _fail(path, "", f"artifact {n} is a {type(entry).__name__}, not a table: write [[artifact]]")
        where = f"artifact {entry.get('name', n)!r}: "
        if "to" not in entry:
            raise _fail(path, where, "needs to = \"pip|gguf|onnx|safetensors\"")
        source = entry.get("source", next(iter(sources)) if len(sources) == 1 else None)
        if source not in sources:
            raise _fail(path, where, f"source {source!r} is not one of [sources] ({', '.join(sources)})")
        to, layout = entry["to"], entry.get("layout")
        try:
            fmt = writer_for(to, layout)
        except RwkvConvertError as e:
            raise _fail(path, where, str(e)) from None
        given = {k: v for k, v in entry.items() if k not in ARTIFACT_KEYS}
        options = _format_options(path, where, to, layout, given)
        name = entry.get("name") or "-".join([source, fmt.name, *(str(v) for v in given.values()
                                                                     if isinstance(v, str) and "/" not in v)])
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) if "name" not in entry else name
        if not isinstance(name, str) or not _NAME.match(name):
            raise _fail(path, where, "a name is letters, digits, '.', '_' and '-'")
        if name in seen:
            raise _fail(path, where, "two artifacts have this name; give each its own name")
        seen.add(name)
        output = entry.get("output", name + SUFFIXES.get(fmt.name, ""))
        parts = Path(output).parts if isinstance(output, str) else ()
        if not parts or Path(output).is_absolute() or ".." in parts or parts[0] == STAMPS or "\0" in output:
            raise _fail(path, where, f"output is a file name inside --out (not {output!r}: not '.', '..', absolute or"
                        f" in {STAMPS}/, the release's key store)")
        tolerance = entry.get("tolerance", {})
        bad = sorted(set(tolerance) - set(TOLERANCE_KEYS)) if isinstance(tolerance, dict) else ["?"]
        if bad or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          and (0 <= v <= 1 if k == "top1" else v > 0) for k, v in tolerance.items()):
            raise _fail(path, where, "tolerance takes max_abs, rel_l2 and kl above 0 and top1 from 0 to 1")
        runner = entry.get("runner", "native")
        if runner not in ("native", "ours"):
            raise _fail(path, where, "runner is native (the format's runtime) or ours")
        artifacts.append(Artifact(name, source, to, layout, options, output, runner,
                                  {k: float(v) for k, v in tolerance.items()}))
    outputs = [a.output for a in artifacts]
    if len(set(outputs)) != len(outputs):
        raise _fail(path, "", "two artifacts write the same output; give each its own")
    tokens, seed = settings.get("tokens", 64), settings.get("seed", 0)
    quality, quality_bytes = settings.get("quality", False), settings.get("quality_bytes", 16384)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (tokens, seed, quality_bytes)) or tokens < 2 \
            or quality_bytes < 1 or not isinstance(quality, bool):
        raise _fail(path, "[release]: ", "tokens is an integer >= 2, seed an integer, quality true or false and"
                    " quality_bytes an integer >= 1")
    return Release(path, hashlib.sha256(data).hexdigest(), str(settings.get("title", path.stem)), sources, artifacts,
                   tokens, seed, quality, quality_bytes)


# ---- keys --------------------------------------------------------------------------------------------------

def content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or, for a directory, over its files' names and SHA-256s (in order)."""
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def runtime_versions() -> dict[str, str | None]:
    return {package: installed_version(package) for package in RUNTIME_PACKAGES}


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


def plan_jobs(release: Release, artifacts: list[Artifact], out: Path, reverify: bool = False) -> list[Job]:
    """Each artifact's job with its keys; the sources are hashed (once each) and checked against the formats
    here, so that a conversion the format cannot do is bad input before anything is built."""
    specs, digests = {}, {}
    for a in artifacts:
        if a.source not in specs:
            specs[a.source] = read_checkpoint(release.sources[a.source]).spec
            digests[a.source] = content_digest(release.sources[a.source])
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
        key = _digest({"tool": __version__, "source": digests[a.source], "to": writer_for(a.to, a.layout).target,
                       "options": a.options, "option_files": files, "output": a.output})
        quality = release.quality_bytes if release.quality else None
        verify_key = _digest({"build": key, "tokens": release.tokens, "seed": release.seed, "runner": a.runner,
                              "tolerance": a.tolerance, "runtimes": versions, "quality": quality})
        jobs.append(Job(a, str(release.sources[a.source]), str(out), key, verify_key, release.tokens, release.seed,
                        reverify, quality, specs[a.source].n_params, tuple(map(str, release_inputs(release)))))
    return jobs


def release_inputs(release: Release) -> list[Path]:
    """What a release reads: its file, its sources and the files its options name."""
    files = [release.path, *release.sources.values()]
    files += [Path(v) for a in release.artifacts for k, v in a.options.items()
              if k in PATH_OPTIONS and isinstance(v, str) and v != "bundled"]
    return files


# ---- one artifact ------------------------------------------------------------------------------------------

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
        written = convert(job.source, a.to, target, layout=a.layout, **a.options)
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
    key = (job.source, job.tokens, job.seed, ln0_fold)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_run(job.source, job.tokens, job.seed, ln0_fold)
    ref = _REFERENCES[key]
    run = candidate_run(candidate, ref, None, job.artifact.runner, job.source)
    report = score(ref, run, candidate, job.source, overrides=job.artifact.tolerance)
    tol = report.tolerance
    return {"runtime": report.runner, "scheme": report.scheme, "passed": report.passed,
            "failure": failure_line(report), "metrics": _metrics(report),
            "tolerance": {"max_abs": tol.max_abs, "rel_l2": tol.rel_l2, "kl": tol.kl, "top1": tol.top1,
                          "reason": tol.reason}}


def _quality(job: Job, candidate: Path) -> dict:
    return file_figures(job.source, candidate, max_bytes=job.quality_bytes)


def run_job(job: Job, progress: Callable[[str, str], None] = lambda name, what: None) -> dict:
    """Build the artifact unless it is up to date, verify it unless its stored verification still holds, and
    return {"entry": the report entry, "built": bool, "verified": bool}. Errors of this artifact (a missing
    runtime, a failed conversion) become its entry's error, not the release's."""
    a, out = job.artifact, Path(job.out)
    stamp_path = _stamp_path(job)
    stamp = _read_stamp(stamp_path)
    entry = {"name": a.name, "source": a.source, "format": writer_for(a.to, a.layout).target,
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


# ---- running many ------------------------------------------------------------------------------------------

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


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise RwkvConvertError(f"--shard takes K/N with 1 <= K <= N (e.g. 1/4), not {text!r}")
    return int(m.group(1)), int(m.group(2))


def select(release: Release, only: list[str], shard: tuple[int, int] | None) -> tuple[list[Artifact], list[str]]:
    """(this run's artifacts, the names of every artifact the shards of this selection share out)."""
    chosen = release.artifacts
    if only:
        names = {a.name for a in release.artifacts}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise RwkvConvertError(f"--only: no artifact named {', '.join(unknown)} in {release.path} (it has"
                                   f" {', '.join(sorted(names))})")
        chosen = [a for a in release.artifacts if a.name in only]
    everything = [a.name for a in chosen]
    if shard:
        k, n = shard
        chosen = [a for i, a in enumerate(chosen) if i % n == k - 1]  # round robin: neighbours differ in cost
    return chosen, everything


def build_report(release: Release, chosen: list[str], shard, results: dict[str, dict], seconds: float) -> dict:
    entries = [results[name]["entry"] for name in chosen if name in results]
    report = {"tool": f"rwkv-convert {__version__}",
              "release": {"file": release.path.name, "sha256": release.digest, "title": release.title,
                          "artifacts": chosen},
              "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
              "artifacts": entries,
              "run": {"built": [n for n, r in results.items() if r["built"]],
                      "verified": [n for n, r in results.items() if r["verified"]],
                      "seconds": {n: round(r["seconds"], 3) for n, r in results.items()},
                      "total_seconds": round(seconds, 3)}}
    report["summary"] = summarize(entries)
    return report


def summarize(entries: list[dict]) -> dict:
    count = {s: sum(e["status"] == s for e in entries) for s in ("passed", "failed", "error")}
    return {"artifacts": len(entries), **count}


def exit_code(report: dict) -> int:
    return 0 if report["summary"]["passed"] == report["summary"]["artifacts"] else 1


def merge_reports(paths: list[str | os.PathLike]) -> dict:
    """The shards' JSON reports as one, equal to the unsharded run's (its "run" part aside)."""
    reports = []
    for p in paths:
        try:
            reports.append(json.loads(Path(p).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise RwkvConvertError(f"cannot read the report {p}: {getattr(e, 'strerror', None) or e}") from None
    if not reports:
        raise RwkvConvertError("--merge-reports needs the shards' JSON reports")
    first = reports[0]
    for p, r in zip(paths, reports, strict=True):
        if not isinstance(r, dict) or "release" not in r or "artifacts" not in r:
            raise RwkvConvertError(f"{p} is not a release report (release-report*.json)")
        if r["release"] != first["release"]:
            raise RwkvConvertError(f"{p} comes from another release file or selection than {paths[0]}")
    shards = [r.get("shard") for r in reports]
    n = {int(s.split("/")[1]) for s in shards if s}
    if None in shards or len(n) != 1 or sorted(int(s.split("/")[0]) for s in shards) != list(range(1, n.pop() + 1)):
        raise RwkvConvertError(f"the reports are shards {', '.join(map(str, shards))}: give every shard K/N of one"
                               " split once")
    chosen = first["release"]["artifacts"]
    by_name = {e["name"]: e for r in reports for e in r["artifacts"]}
    missing = [name for name in chosen if name not in by_name]
    if missing:
        raise RwkvConvertError(f"the shards' reports lack {', '.join(missing)}: a shard did not finish")
    entries = [by_name[name] for name in chosen]
    runs = [r.get("run", {}) for r in reports]
    return {"tool": first["tool"], "release": first["release"], "shard": None, "artifacts": entries,
            "run": {"built": [n for r in runs for n in r.get("built", [])],
                    "verified": [n for r in runs for n in r.get("verified", [])],
                    "seconds": {k: v for r in runs for k, v in r.get("seconds", {}).items()},
                    "total_seconds": max(r.get("total_seconds", 0) for r in runs), "merged": len(reports)},
            "summary": summarize(entries)}


# ---- reports -----------------------------------------------------------------------------------------------

def junit_xml(report: dict) -> str:
    entries = report["artifacts"]
    seconds = report["run"].get("seconds", {})
    suite = ET.Element("testsuite", name=f"rwkv-convert release {report['release']['title']}",
                       tests=str(len(entries)), failures=str(report["summary"]["failed"]),
                       errors=str(report["summary"]["error"]), skipped="0",
                       time=f"{sum(seconds.get(e['name'], 0) for e in entries):.3f}")
    for e in entries:
        case = ET.SubElement(suite, "testcase", classname=f"release.{e['source']}", name=e["name"],
                             time=f"{seconds.get(e['name'], 0):.3f}")
        if e["status"] == "failed":
            failure = ET.SubElement(case, "failure", message=e["failure"] or "verification failed",
                                    type="verification")
            failure.text = (f"{e['format']} in {e['runtime']}: {e['failure']}\nbound: {e['tolerance']['reason']}\n"
                            f"worst metrics: {json.dumps(e['metrics'])}")
        elif e["status"] == "error":
            ET.SubElement(case, "error", message=e["failure"], type="error").text = e["failure"]
        else:
            ET.SubElement(case, "system-out").text = (f"{e['format']} in {e['runtime']}: max |Δ|"
                                                      f" {e['metrics']['max_abs']:.3g}, KL {e['metrics']['kl']:.3g}")
    suites = ET.Element("testsuites", name="rwkv-convert release")
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(e: dict, quality: bool = False, checked_now: bool = True) -> list[str]:
    """A report row: artifact, format, size, bytes/param, runtime, scheme, max |Δ|, KL (and its bound), top-1,
    [bits/byte,] verdict. checked_now: verified in this run (else its stored verification was kept: the key and
    the files' hashes still match)."""
    if e["status"] == "error":
        return [e["name"], e["format"], "-", "-", "-", "-", "-", "-", "-", *(["-"] if quality else []),
                f"ERROR: {e['failure']}"]
    m, q, tol = e["metrics"], e.get("quality"), e.get("tolerance", {})
    figures = [f"{q['bits_per_byte']:.4f} ({q['delta_bits_per_byte'] * 100:+.2f}%)" if q else "-"] if quality else []
    runtime = re.sub(r" reading .*?(\([^()]*\))$", r" \1", e["runtime"])  # the format is its own column
    runtime = runtime.removesuffix(" (cpu fp32)")  # a client's own run: no strategy of ours to name
    kl = f"{_number(m['kl'], '.2e')} (<= {_number(tol['kl'], '.2g')})" if tol.get("kl") is not None else \
        _number(m["kl"], ".2e")
    verdict = "pass" if e["status"] == "passed" else f"FAIL: {e['failure']}"
    if not checked_now:
        verdict += " (kept: key and hashes match)"
    return [e["name"], e["format"], human_size(e["bytes"]), f"{e['bytes_per_param']:.3f}", runtime,
            e.get("scheme", "-"), _number(m["max_abs"], ".3g"), kl, _number(m["top1"], ".1%"), *figures, verdict]


def markdown(report: dict) -> str:
    entries = report["artifacts"]
    quality = any(e.get("quality") for e in entries)
    head = ["artifact", "format", "size", "bytes/param", "runtime", "scheme", "max abs Δ", "KL (bound)", "top-1*",
            *(["bits/byte (Δ)"] if quality else []), "verified"]
    s = report["summary"]
    now = set(report.get("run", {}).get("verified", []))
    lines = [f"## {report['release']['title']}", "",
             f"{s['artifacts']} artifacts: {s['passed']} verified, {s['failed']} failed, {s['error']} not built or"
             f" not run. Each was run in its runtime on a fixed and a random token stream (sequence, token by"
             f" token, two chunks with the state carried) against the source at fp32 ({report['tool']}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = _cells(e, quality, e["name"] in now)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "scheme: the least precise weights of the file, whose bounds it is judged by; KL: the worst mean"
              " KL(source || artifact) over the streams and modes, with its bound; top-1*: argmax agreement where the"
              " source's best logit leads by more than the max |Δ| bound; every artifact is also judged against a"
              " model that knows nothing of the input (docs/verification.md). The bounds and why:", ""]
    reasons = {e["scheme"]: e["tolerance"].get("reason", "") for e in entries if e.get("scheme") and e.get("tolerance")}
    lines += [f"- {scheme}: {reason}" for scheme, reason in reasons.items()]
    if quality:
        lines += ["", "bits/byte: on the held-out text (quality), Δ against the source at fp32."]
    return "\n".join(lines) + "\n"


def table(report: dict) -> str:
    """The terminal table: one line per artifact."""
    rows = [["artifact", "format", "size", "B/param", "runtime", "scheme", "max|Δ|", "KL (bound)", "top-1*",
             "verified"]]
    now = set(report.get("run", {}).get("verified", []))
    for e in report["artifacts"]:
        rows.append(_cells(e, checked_now=e["name"] in now))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    s = report["summary"]
    kept = sum(1 for e in report["artifacts"] if e["status"] == "passed" and e["name"] not in now)
    lines.append(f"{s['passed']}/{s['artifacts']} verified" + (f" ({kept} kept: key and hashes match)" if kept else "")
                 + (f", {s['failed']} failed" if s["failed"] else "")
                 + (f", {s['error']} errors" if s["error"] else ""))
    return "\n".join(lines)


def report_paths(out: Path, shard) -> dict[str, Path]:
    stem = REPORT_NAME if shard is None else f"{REPORT_NAME}-shard{shard[0]}of{shard[1]}"
    return {kind: out / f"{stem}.{kind}" for kind in ("json", "xml", "md")}


def json_safe(obj):
    """obj with every non-finite float as None (an unbounded tolerance, a metric of non-finite logits): strict
    JSON parsers (jq, JavaScript's JSON.parse) refuse Infinity and NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_reports(report: dict, out: Path, shard=None) -> dict[str, Path]:
    paths = report_paths(out, shard)
    write_text_atomic(paths["json"], json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    write_text_atomic(paths["xml"], junit_xml(report))
    write_text_atomic(paths["md"], markdown(report))
    return paths
