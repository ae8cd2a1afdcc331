"""A release run from start to end, as `rwkv-convert release` asks for it: the release file (or the shards'
reports) read, the artifacts chosen, built and verified, the report made. The top of release/: it uses the
release file, the jobs and the reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import check_output
from ..errors import RwkvConvertError
from .jobs import default_memory_budget, plan_jobs, run_jobs
from .reports import build_report, merge_reports
from .spec import (
    STAMPS,
    Artifact,
    Release,
    bundled_release,
    parse_release,
    parse_shard,
    release_inputs,
    report_paths,
    select,
)


@dataclass
class ReleaseRequest:
    """What a release run reads, and what it will write (checked by the caller's output guard before any work)."""
    spec: Release | None  # None: merging the shards' reports
    reads: list[Path]  # the files it reads: nothing it writes may land on them
    shard: tuple[int, int] | None
    reports: dict[str, Path]  # the report paths it will write
    chosen: list[Artifact] = field(default_factory=list)  # what this run builds
    everything: list[str] = field(default_factory=list)  # the names the shards of this selection share out


def open_release(files: list[str], out: Path, merge: bool = False, shard: str | None = None,
                 only: list[str] = ()) -> ReleaseRequest:
    """The release file (default: the bundled model's) and the artifacts chosen from it (`only`: names, or
    comma-separated lists of them; `shard`: "K/N"), or with merge the shards' JSON reports."""
    if merge:
        return ReleaseRequest(None, [Path(f) for f in files], None, report_paths(out, None))
    if len(files) > 1:
        raise RwkvConvertError("give one release file (or --merge-reports with the shards' reports)")
    spec = parse_release(files[0] if files else bundled_release())
    k_n = parse_shard(shard)
    chosen, everything = select(spec, [n.strip() for item in only for n in item.split(",") if n.strip()], k_n)
    return ReleaseRequest(spec, release_inputs(spec), k_n, report_paths(out, k_n), chosen, everything)


def check_reports(request: ReleaseRequest) -> None:
    """Before any work: the reports may go anywhere the output guard allows (call within its inputs)."""
    for path in request.reports.values():
        check_output(path)


def interrupted_line(request: ReleaseRequest, out: Path) -> str:
    """What an interrupted run leaves: the artifacts in `out` that are whole (have their key)."""
    whole = len(list((out / STAMPS).glob("*.json")))
    return (f"interrupted: {whole} of {len(request.everything)} artifacts are whole in {out}, no partial file was"
            " left; run the same command again to finish")


def run_release(request: ReleaseRequest, out: Path, workers: int = 1, max_memory: int | None = None,
                reverify: bool = False, event: Callable[[str, str], None] = lambda name, stage: None) -> dict:
    """The release's report: the shards' reports merged, or the chosen artifacts built (when not up to date),
    verified and reported; event(artifact name, stage) hears each job's stages as they happen."""
    if request.spec is None:
        return merge_reports([str(p) for p in request.reads])
    started = time.monotonic()
    budget = max_memory if max_memory is not None else default_memory_budget()
    jobs = plan_jobs(request.spec, request.chosen, out.resolve(), reverify)
    out.mkdir(parents=True, exist_ok=True)
    results = run_jobs(jobs, workers, budget, event)
    return build_report(request.spec, request.everything, request.shard, results, time.monotonic() - started)
