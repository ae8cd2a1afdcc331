"""The CLI's shared parts: the options every reporting command takes, the guard for what a command writes, the
JSON document, the format flags of `convert` (one per flag some format's options declare), progress on stderr, and
text to and from a terminal. Parsing and printing only: the work is the library's."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from . import progress
from .adapters import adapter_refs
from .atomic import Interrupted, check_output, check_target_directory, protecting, write_text_atomic
from .bundled import model_path
from .errors import CastWarning, RwkvConvertError
from .formats import registry
from .formats.base import flag_of
from .json_text import json_safe
from .runtimes.base import RUNNER_ALIASES, RUNNERS, runner_named

LN0_HELP = ("How original weights get ln0 folded into the embedding: fp32 (accurate) or package (as the rwkv pip"
            " package does: v4-v6 in the file's dtype, v7 in the strategy's), to compare with it bit for bit.")

CLEAR_LINE = "\r\033[K"


def bar(done: int, total: int, width: int = 24) -> str:
    """[####....] done/total, as both progress renderers draw it."""
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


class StderrProgress:
    """The library's progress steps on stderr (never stdout: --json output stays clean). On a terminal a bar,
    redrawn; in a log a line once a step has taken show_after_s (2 s), then every EVERY_S, and when it ends."""

    EVERY_S = 5.0

    def __init__(self):
        self.tty = sys.stderr.isatty()
        # RWKV_CONVERT_PROGRESS_AFTER=0: a line for every step of every length (logs that want them all)
        self.show_after_s = float(os.environ.get("RWKV_CONVERT_PROGRESS_AFTER") or 2.0)
        self.started: dict[str, float] = {}
        self.shown: dict[str, float] = {}  # step -> when its last line was written

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        self.started.setdefault(what, now)
        finished = done >= total
        if self.tty:
            if finished:
                click.echo(CLEAR_LINE, nl=False, err=True)
            elif now - self.shown.get(what, 0.0) >= 0.1:
                click.echo(f"{CLEAR_LINE}{what} {bar(done, total)}", nl=False, err=True)
                self.shown[what] = now
        elif (finished and what in self.shown) or (not finished and now - self.started[what] >= self.show_after_s
                                                   and now - self.shown.get(what, 0.0) >= self.EVERY_S):
            click.echo(f"{what}: {done}/{total}", err=True)
            self.shown[what] = now
        if finished:  # the same step may run again later (another stream, another file)
            self.started.pop(what, None)
            self.shown.pop(what, None)


def json_options(command):
    """--json and --json-out, the same on every command that reports: --json puts the JSON document alone on
    stdout (the human-readable output goes to stderr); --json-out FILE also writes it to FILE."""
    command = click.option("--json-out", "json_out", default=None, type=click.Path(dir_okay=False, path_type=str),
                           help="Also write the JSON document to this file.")(command)
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the JSON document on stdout (the human-readable output goes to stderr).")(command)


def state_option(command):
    """--state FILE: a state-tuning file (blocks.i.att.time_state) applied to the model's original weights."""
    return click.option("--state", "state", default=None, type=click.Path(dir_okay=False, path_type=str),
                        help="A state-tuning file (blocks.i.att.time_state: .pth or safetensors) to start from,"
                             " applied to the original weights (shapes checked against the model).")(command)


def adapter_options(command):
    """--lora FILE (repeatable) with --lora-alpha, --lora-init and --lora-scale: fine-tuning adapters merged into
    the original weights as they are read (adapters.py); the command gets them as `adapters`."""
    @functools.wraps(command)
    def with_refs(*args, lora, lora_alpha, lora_init, lora_scale, **kwargs):
        return command(*args, adapters=adapter_refs(lora, lora_alpha, lora_init, lora_scale), **kwargs)

    for flag, kind, text in (
            ("--lora-scale", str, "The fraction of the fine-tune to apply (default 1); once, or once per --lora."),
            ("--lora-init", str, "PiSSA: the init file the adapter was trained from (init_lora_A/B): its presence"
                                 " is what makes the adapter PiSSA; once, or once per --lora (none for the others)."),
            ("--lora-alpha", str, "LoRA: the alpha it was trained with (required; files do not store it); once,"
                                  " or once per --lora (none for adapters without one)."),
            ("--lora", click.Path(dir_okay=False, path_type=str),
             "A fine-tuning adapter to merge (RWKV-PEFT's LoRA, PiSSA, Bone or DiSHA .pth; the kind is read from"
             " its tensors); repeat for stacked fine-tunes, merged in order.")):
        with_refs = click.option(flag, flag.removeprefix("--").replace("-", "_"), multiple=True, type=kind,
                                 help=text)(with_refs)
    return with_refs


def adapter_paths(adapters) -> list[Path]:
    """The files the adapters name (adapters and PiSSA init files): inputs, like the model."""
    return [p for ref in adapters for p in (ref.path, ref.init) if p is not None]


def check_reports(reports: dict[str, str | None]) -> None:
    """Before the work: a report ({"--json-out": path, "--plot": path}) that cannot be written (or that would land
    on an input: call this within `inputs(...)`, or on another report) must not follow a result."""
    seen: dict[Path, str] = {}
    for option, given in reports.items():
        if not given:
            continue
        path = Path(given)
        if path.absolute() in seen:
            raise click.UsageError(f"{seen[path.absolute()]} and {option} name the same file; give each its own")
        seen[path.absolute()] = option
        check_output(path)
        check_target_directory(path)


def inputs(*paths) -> protecting:
    """The command's input files and folders: nothing it writes (reports included) may land on them."""
    return protecting(*(model_path(p) for p in paths if p is not None))


def runner_option(help: str):
    """--runner: the file's own runtime (client) or our reader (ours); "native" is client's older name."""
    return click.option("--runner", default="client", show_default=True,
                        type=click.Choice([*RUNNERS, *RUNNER_ALIASES]),
                        callback=lambda _context, _option, word: runner_named(word), help=help)


@contextlib.contextmanager
def reporting(json_out: str | None, *paths) -> Iterator[None]:
    """A reporting command's inputs guarded (inputs()) and its --json-out checked before the work."""
    with inputs(*paths):
        check_reports({"--json-out": json_out})
        yield


def stream(prompt: str, pieces: Iterator[str]) -> None:
    """Generated text on stdout as it comes (control bytes shown as \\xNN on a terminal). The prompt is echoed
    once the model has read it, so that an error (a tokenizer the model does not fit) is a line of its own."""
    shown = printable if sys.stdout.isatty() else str
    echoed = False
    for piece in pieces:
        if not echoed:
            click.echo(shown(prompt), nl=False)
            echoed = True
        click.echo(shown(piece), nl=False)
    click.echo(shown(prompt) if not echoed else "")


def emit(human: str, document, as_json: bool, json_out: str | None) -> None:
    text = json.dumps(json_safe(document), indent=2, allow_nan=False)  # null for an unbounded tolerance
    if json_out:
        write_text_atomic(Path(json_out), text + "\n")
    if as_json:
        click.echo(human, err=True)
        click.echo(text)
    else:
        click.echo(human)


def unescaped(ctx, param, value: str | None) -> str | None:
    """A click callback: the option's text, unescaped."""
    return None if value is None else unescape(value)


def unescape(text: str) -> str:
    r"""--prompt "User: hi\n\nAssistant:" as the shell passes it (a backslash and an n) means a newline."""
    return re.sub(r"\\(\\|n|t)", lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], text)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str) -> str:
    """Text for a terminal: control bytes (escape sequences that would drive it) shown as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _format_flags() -> dict[str, click.Option]:
    """One click option per flag that some format's write options declare (--dtype serves several)."""
    flags: dict[str, click.Option] = {}
    for fmt in registry.writers():
        for f in dataclasses.fields(fmt.options):
            flag = flag_of(f)
            if flag in flags:
                continue
            fields = [g for w in registry.writers() for g in dataclasses.fields(w.options) if flag_of(g) == flag]
            choices = sorted({c for g in fields for c in (g.metadata.get("choices") or ())})
            # a storage type's word is checked by the format's options, which name a foreign one (precision.py)
            storage = any(g.metadata.get("storage") for g in fields)
            kind = click.Choice(choices, case_sensitive=False) if choices and not storage else None
            flags[flag] = click.Option([flag], default=None, type=kind, help=f.metadata["help"])
    return flags


FORMAT_FLAGS = _format_flags()

_FLAG_OF_DEST = {opt.name: flag for flag, opt in FORMAT_FLAGS.items()}


class ConvertCommand(click.Command):
    """`convert`: the general options, then one per format flag (FORMAT_FLAGS); its --help lists the options of
    each format under its own heading."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(FORMAT_FLAGS.values())

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        general = [p.get_help_record(ctx) for p in self.get_params(ctx)
                   if isinstance(p, click.Option) and p.name not in _FLAG_OF_DEST]
        with formatter.section("Options"):
            formatter.write_dl([r for r in general if r])
        for fmt in registry.writers():
            rows = []
            for f in dataclasses.fields(fmt.options):
                choices = f.metadata.get("choices")
                shown = flag_of(f) + (f" [{'|'.join(map(str, choices))}]" if choices else "")
                default = "" if f.default is None else f"  [default: {f.default}]"
                rows.append((shown, f.metadata["help"] + default))
            if rows:
                with formatter.section(f"--to {fmt.target}"):
                    formatter.write_dl(rows)


def format_options(target: str, layout: str | None, given: dict) -> dict:
    """The format flags the user gave, under the chosen format's option names. A flag of another format is
    a usage error that names the formats it belongs to."""
    fmt = registry.writer_for(target, layout)
    own = {FORMAT_FLAGS[flag_of(f)].name: f.name for f in dataclasses.fields(fmt.options)}
    options = {}
    for dest, value in given.items():
        if value is None:
            continue
        if dest not in own:
            flag = _FLAG_OF_DEST[dest]
            owners = [w.target for w in registry.writers()
                      if any(flag_of(g) == flag for g in dataclasses.fields(w.options))]
            # where the value is a word of one of them (--quant q8_0: gguf's, q4: mlx's), that one
            takes = [w.target for w in registry.writers() for g in dataclasses.fields(w.options)
                     if flag_of(g) == flag and str(value).lower() in {str(c).lower() for c in g.metadata.get("choices")
                                                                       or ()}]
            owners = takes or owners
            raise click.UsageError(f"{flag.split('/')[0]} is an option of --to {' / '.join(owners)}, not of --to"
                                   f" {fmt.target}")
        options[own[dest]] = value
    return options


class ReleaseProgress:
    """Progress of a release on stderr: a redrawn bar on a terminal, a line per event in a log, nothing with
    --quiet."""

    def __init__(self, names: list[str], quiet: bool, interrupted: Callable[[], str] = lambda: "interrupted"):
        self.names, self.done, self.running, self.interrupted = names, 0, {}, interrupted
        self.mode = "quiet" if quiet else "bar" if sys.stderr.isatty() else "lines"

    def __call__(self, name: str, what: str) -> None:
        if what in ("passed", "failed", "error"):
            self.done += 1
            self.running.pop(name, None)
        else:
            self.running[name] = what
        if self.mode == "lines" and what != "started":  # a job's first stage says it started
            click.echo(f"[{self.done}/{len(self.names)}] {name}: {what}", err=True)
        elif self.mode == "bar":
            now = ", ".join(f"{n} {w}" for n, w in self.running.items())
            line = f"{bar(self.done, len(self.names))} {now}"
            click.echo(f"{CLEAR_LINE}{line[:200]}", nl=False, err=True)
            if what != "started" and what not in ("building", "verifying", "quality"):
                click.echo(f"{CLEAR_LINE}{name}: {what}", err=True)

    def close(self) -> None:
        if self.mode == "bar":
            click.echo(CLEAR_LINE, nl=False, err=True)

    def __enter__(self) -> ReleaseProgress:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close()
        if kind is not None and issubclass(kind, (KeyboardInterrupt, Interrupted)):
            click.echo(self.interrupted(), err=True)  # before the Group's own line, which says how it ended


class Group(click.Group):
    """Turns errors a user can fix into one line on stderr and exit code 2 (`--debug` shows the trace)."""

    def invoke(self, ctx: click.Context):
        try:
            with progress.showing(StderrProgress()):
                return super().invoke(ctx)
        except RwkvConvertError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"{CLEAR_LINE if sys.stderr.isatty() else ''}error: {e}", err=True)  # over a progress bar
            sys.exit(e.exit_code)
        except Interrupted as e:  # SIGTERM/SIGHUP during a write: its temps are gone; exit as the signal would
            click.echo(f"error: stopped by {e.args[0]}; no partial output was left", err=True)
            sys.exit(128 + e.signum)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no partial output was left", err=True)
            sys.exit(130)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our notes (CastWarning) as one line; other warnings as Python shows them."""
    if issubclass(category, CastWarning):
        click.echo(f"note: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


@contextlib.contextmanager
def line_progress() -> Iterator[Callable[[str], None]]:
    """A callback for lines of progress: redrawn in place on a terminal (cleared at the end), in a log only the
    lines that are not per window."""
    if not sys.stderr.isatty():
        yield lambda line: None if "window" in line else click.echo(line, err=True)
        return
    try:
        yield lambda line: click.echo(f"{CLEAR_LINE}{line}", nl=False, err=True)
    finally:
        click.echo(CLEAR_LINE, nl=False, err=True)
