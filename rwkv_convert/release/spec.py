"""The release file: its keys, sources and artifacts (parsed and checked whole before anything is built), the
digests keys are made of, the shards, and where the reports go. The bottom of release/: jobs and reports
import it, never the other way round."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import AdapterRef, adapter_refs
from ..bundled import BUNDLED_PREFIX, bundled_file, model_path
from ..checkpoint import file_sha256
from ..errors import RwkvConvertError
from ..formats.base import flag_of
from ..formats.registry import targets, writer_for
from ..runtimes import CLIENTS
from ..runtimes.base import installed_version, runner_named

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPORT_NAME = "release-report"
STAMPS = ".rwkv-release"  # the keys and verifications, one JSON file per artifact, inside --out
# the output name an artifact gets when the release file gives none: NAME + this
SUFFIXES = {"pip": ".pth", "pth": ".pth", "gguf": ".gguf", "onnx": ".onnx", "web-rwkv": ".st",
            "prepared": ".safetensors", "hf": "", "mlx": ""}
PATH_OPTIONS = ("tokenizer", "calibration", "imatrix")  # options that name a file: its bytes are part of the key
TOLERANCE_KEYS = ("max_abs", "rel_l2", "kl", "top1")
ARTIFACT_KEYS = ("name", "source", "to", "layout", "output", "runner", "tolerance")
RELEASE_KEYS = ("title", "tokens", "seed", "quality", "quality_bytes")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Artifact:
    name: str
    source: str  # a key of Release.sources
    to: str
    layout: str | None
    options: dict  # the format's option names -> values (file options resolved to absolute paths)
    output: str  # relative to the output directory
    runner: str = "client"
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
    adapters: dict[str, tuple[AdapterRef, ...]] = field(default_factory=dict)  # per source: merged in order


def bundled_release() -> Path:
    """The release file of the bundled trained model (the README's main job)."""
    return bundled_file("release.toml")


def _fail(path: Path, where: str, what: str) -> RwkvConvertError:
    return RwkvConvertError(f"{path}: {where}{what}")


SOURCE_KEYS = ("model", "lora", "lora_alpha", "lora_init", "lora_scale")


def _source(path: Path, name: str, value) -> tuple[Path, tuple[AdapterRef, ...]]:
    """A source: a checkpoint's path, or a table of one with fine-tuning adapters merged into it
    ({model = "base.pth", lora = ["ft.pth"], lora_alpha = 32}: the --lora options, paths relative to the file)."""
    if not isinstance(value, dict):
        return _source_path(path, value), ()
    where = f"[sources] {name}: "
    bad = sorted(set(value) - set(SOURCE_KEYS))
    if bad or "model" not in value:
        raise _fail(path, where, f"a source table has model (the base checkpoint) and lora, lora_alpha, lora_init,"
                    f" lora_scale{f' (not {bad[0]})' if bad else ''}")

    def listed(key: str, files: bool = False) -> list[str]:
        given = value.get(key, [])
        items = given if isinstance(given, list) else [given]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise _fail(path, where, f"{key} is a value or a list of values, not {given!r}")
        return [str((path.parent / v).resolve()) if files and isinstance(v, str) and v.lower() != "none" else str(v)
                for v in items]

    try:
        refs = adapter_refs(listed("lora", True), listed("lora_alpha"), listed("lora_init", True),
                            listed("lora_scale"))
    except RwkvConvertError as e:
        raise _fail(path, where, str(e).replace("--lora-", "lora_").replace("--lora", "lora")) from None
    return _source_path(path, value["model"]), refs


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
    read_sources = {name: _source(path, name, value) for name, value in doc.get("sources", {}).items()}
    sources = {name: model for name, (model, _) in read_sources.items()}
    adapters = {name: refs for name, (_, refs) in read_sources.items() if refs}
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
            raise _fail(path, where, f"needs to = \"{'|'.join(targets())}\"")
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
        try:
            runner = runner_named(entry.get("runner", "client"))
        except (RwkvConvertError, TypeError):
            raise _fail(path, where, "runner is client (the format's own runtime) or ours") from None
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
                   tokens, seed, quality, quality_bytes, adapters)


def content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or, for a directory, over its files' names and SHA-256s (in order)."""
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def runtime_versions() -> dict[str, str | None]:
    """The installed versions of torch (our runner) and of every client: part of each verdict's key, so that a
    new runtime re-verifies what it runs."""
    return {package: installed_version(package) for package in ("torch", *(c.distribution for c in CLIENTS))}


def release_inputs(release: Release) -> list[Path]:
    """What a release reads: its file, its sources and the files its options name."""
    files = [release.path, *release.sources.values()]
    files += [p for refs in release.adapters.values() for ref in refs for p in (ref.path, ref.init) if p is not None]
    files += [Path(v) for a in release.artifacts for k, v in a.options.items()
              if k in PATH_OPTIONS and isinstance(v, str) and v != "bundled"]
    return files


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


def report_paths(out: Path, shard) -> dict[str, Path]:
    stem = REPORT_NAME if shard is None else f"{REPORT_NAME}-shard{shard[0]}of{shard[1]}"
    return {kind: out / f"{stem}.{kind}" for kind in ("json", "xml", "md")}
