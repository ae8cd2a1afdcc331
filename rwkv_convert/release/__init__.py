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

from .jobs import Job, default_memory_budget, failure_line, job_memory, plan_jobs, remove_recorded, run_job, run_jobs
from .reports import build_report, exit_code, junit_xml, markdown, merge_reports, summarize, table, write_reports
from .run import ReleaseRequest, check_reports, interrupted_line, open_release, run_release
from .spec import (
                   REPORT_NAME,
                   STAMPS,
                   SUFFIXES,
                   Artifact,
                   Release,
                   bundled_release,
                   content_digest,
                   parse_release,
                   parse_shard,
                   release_inputs,
                   report_paths,
                   runtime_versions,
                   select,
)

__all__ = ["Artifact", "Job", "REPORT_NAME", "Release", "ReleaseRequest", "STAMPS", "SUFFIXES", "build_report",
           "bundled_release", "check_reports", "content_digest", "default_memory_budget", "exit_code",
           "failure_line", "interrupted_line", "job_memory", "junit_xml", "markdown", "merge_reports",
           "open_release", "parse_release", "parse_shard", "plan_jobs", "release_inputs", "remove_recorded",
           "report_paths", "run_job", "run_jobs", "run_release", "runtime_versions", "select", "summarize", "table",
           "write_reports"]
