"""A release's reports: the JSON document, JUnit XML, the Markdown table for a model card, the terminal table,
and merging the shards' reports."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .. import __version__
from ..atomic import write_text_atomic
from ..errors import RwkvConvertError
from ..json_text import json_safe
from ..units import human_size
from .spec import Release, report_paths


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
    if e.get("note"):  # its own client did not run it: never a bare pass
        verdict += f" ({e['note']})"
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


def write_reports(report: dict, out: Path, shard=None) -> dict[str, Path]:
    paths = report_paths(out, shard)
    write_text_atomic(paths["json"], json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    write_text_atomic(paths["xml"], junit_xml(report))
    write_text_atomic(paths["md"], markdown(report))
    return paths
