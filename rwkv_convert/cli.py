"""`rwkv-convert`: a thin Click layer over the library."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import click

from . import __version__, doctor, progress, quality, release, state_file
from .atomic import Interrupted, check_output, check_target_directory, protecting, recording, write_text_atomic
from .bundled import BUNDLED_PREFIX, DEFAULT_PROMPT, model_path, trained_model
from .describe import describe_path, format_description
from .errors import CastWarning, RwkvConvertError
from .fixtures import EXTRA_VARIANTS, VARIANTS, fixture_path
from .formats import registry
from .formats.base import flag_of
from .generate import generate
from .json_text import json_safe
from .plan import format_plan, make_plan
from .runner import LN0_FOLDS
from .tokenizer import HFTokenizer, check_fits, default_tokenizer
from .units import parse_size
from .verify import format_report, verify

NEOX_VOCABS = (50277, 50304)
CHAT_PROMPT = "\nUser: Hello!\n\nAssistant:"  # RWKV-4 Pile/Raven models (GPT-NeoX 20B tokenizer)


LN0_HELP = ("How original weights get ln0 folded into the embedding: fp32 (accurate) or package (as the rwkv pip"
            " package does: v4-v6 in the file's dtype, v7 in the strategy's), to compare with it bit for bit.")


CLEAR_LINE = "\r\033[K"


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
                width = 24
                filled = width * done // max(total, 1)
                click.echo(f"{CLEAR_LINE}{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", nl=False,
                           err=True)
                self.shown[what] = now
        elif (finished and what in self.shown) or (not finished and now - self.started[what] >= self.show_after_s
                                                   and now - self.shown.get(what, 0.0) >= self.EVERY_S):
            click.echo(f"{what}: {done}/{total}", err=True)
            self.shown[what] = now
        if finished:  # the same step may run again later (another stream, another file)
            self.started.pop(what, None)
            self.shown.pop(what, None)


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


def check_json_out(json_out: str | None) -> None:
    """Before the work: a report that cannot be written (or that would land on an input: call this within
    `inputs(...)`) must not follow a result."""
    if json_out:
        check_output(Path(json_out))
        check_target_directory(Path(json_out))


def inputs(*paths) -> protecting:
    """The command's input files and folders: nothing it writes (reports included) may land on them."""
    return protecting(*(model_path(p) for p in paths if p is not None))


def emit(human: str, document, as_json: bool, json_out: str | None) -> None:
    text = json.dumps(json_safe(document), indent=2, allow_nan=False)  # null for an unbounded tolerance
    if json_out:
        write_text_atomic(Path(json_out), text + "\n")
    if as_json:
        click.echo(human, err=True)
        click.echo(text)
    else:
        click.echo(human)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-convert")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Load, run, convert and verify RWKV checkpoints (v4, v5.x, v6, v7).

    \b
    Examples:
      rwkv-convert inspect RWKV-x070-World-1.5B.pth
      rwkv-convert run RWKV-x070-World-1.5B.pth --prompt "User: hi" --tokens 50
      rwkv-convert run            # runs the bundled tiny default model
      rwkv-convert convert RWKV-x070-World-1.5B.pth --to gguf --quant q8_0 -o 1.5B-q8_0.gguf --verify
      rwkv-convert verify 1.5B-q8_0.gguf --reference RWKV-x070-World-1.5B.pth
    """
    ctx.obj = {"debug": debug}
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our notes (CastWarning) as one line; other warnings as Python shows them."""
    if issubclass(category, CastWarning):
        click.echo(f"note: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


@main.command()
@click.argument("path", required=False, default=f"{BUNDLED_PREFIX}v7", type=click.Path(dir_okay=True, path_type=str))
@json_options
def inspect(path: str, as_json: bool, json_out) -> None:
    """Version, dimensions, LoRA ranks, dtypes and parameters of a checkpoint (PATH; default the bundled trained
    RWKV-7, bundled:v7)."""
    with inputs(path):
        check_json_out(json_out)
        info = describe_path(path)
        emit(format_description(info), info, as_json, json_out)


@main.command()
@click.argument("path", required=False, type=click.Path(dir_okay=True, path_type=str))
@click.option("--prompt", default=None, callback=lambda ctx, param, value: None if value is None else unescape(value),
              help="Text to continue; \\n and \\t in it are a newline and a tab (\\\\ for a backslash). Default:"
                   f" {CHAT_PROMPT!r}, or {DEFAULT_PROMPT!r} for the bundled model (trained on Python source).")
@click.option("--tokens", "max_tokens", default=64, show_default=True, type=click.IntRange(0, None),
              help="How many tokens to generate.")
@click.option("--strategy", default=None,
              help='e.g. "cpu fp32" (the default), "cpu bf16", "cpu fp32i8"; converted files use their own.')
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, None))
@click.option("--top-p", default=0.85, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--tokenizer", "tokenizer_file", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="A Hugging Face tokenizer.json (e.g. GPT-NeoX 20B for RWKV-4 Pile models) instead of World.")
@click.option("--ln0-fold", default="fp32", show_default=True, type=click.Choice(LN0_FOLDS), help=LN0_HELP)
@state_option
def run(path, prompt, max_tokens, strategy, temperature, top_p, seed, tokenizer_file, ln0_fold, state) -> None:
    """Generate text from PATH (or the bundled default model), streaming it as it is produced."""
    if path is None:
        path = str(trained_model("v7"))
        click.echo(f"(no model given: running the bundled 2.7M-parameter RWKV-7 trained on Python's standard"
                   f" library, {path})", err=True)
        prompt = DEFAULT_PROMPT if prompt is None else prompt
    prompt = CHAT_PROMPT if prompt is None else prompt
    model = registry.load(path, strategy, ln0_fold, state)
    vocab = model.spec.vocab_size
    if tokenizer_file:
        tokenizer = HFTokenizer(tokenizer_file)
        note = check_fits(tokenizer, vocab)
        if note:
            click.echo(f"note: {note}", err=True)
    else:
        if vocab in NEOX_VOCABS:
            raise RwkvConvertError(f"this model has the GPT-NeoX vocabulary ({vocab} ids), not World; pass"
                                   " --tokenizer 20B_tokenizer.json")
        tokenizer = default_tokenizer(vocab)
    # The prompt is echoed once the model has read it, so that an error (a tokenizer the model does not fit)
    # is a line of its own, not glued to the prompt.
    shown = printable if sys.stdout.isatty() else str
    echoed = False
    for piece in generate(model, tokenizer, prompt, max_tokens, temperature, top_p, seed):
        if not echoed:
            click.echo(shown(prompt), nl=False)
            echoed = True
        click.echo(shown(piece), nl=False)
    click.echo(shown(prompt) if not echoed else "")


@main.command()
@click.argument("path", required=False, default=f"{BUNDLED_PREFIX}v7", type=click.Path(dir_okay=True, path_type=str))
@click.option("--strategy", default="cpu fp32", show_default=True, help='e.g. "cuda fp16i8 *10 -> cuda fp16".')
@json_options
def plan(path: str, strategy: str, as_json: bool, json_out) -> None:
    """Per-layer placement of a strategy on PATH (default the bundled trained RWKV-7, bundled:v7): device, dtypes,
    weight scheme, streaming, memory."""
    with inputs(path):
        check_json_out(json_out)
        ckpt = registry.read_checkpoint(path)
        result = make_plan(ckpt.spec, ckpt.shapes, strategy)
        emit(format_plan(result), result.to_dict(), as_json, json_out)


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
    """`convert --help` lists the options of each format under its own heading."""

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
            raise click.UsageError(f"{flag.split('/')[0]} is an option of --to {' / '.join(owners)}, not of --to"
                                   f" {fmt.target}")
        options[own[dest]] = value
    return options


@main.command(cls=ConvertCommand)
@click.argument("source", type=click.Path(dir_okay=True, path_type=str))
@click.option("--to", "target", default=None, type=click.Choice(registry.targets()),
              help="The format to write (its options are listed under it below). Default: from -o's suffix (.gguf,"
                   " .onnx, .st for web-rwkv, .pth for the pip package), or safetensors where --layout is given.")
@click.option("--layout", default=None, type=click.Choice([f.name for f in registry.writers() if f.family]),
              help="With --to safetensors: web-rwkv (.st for web-rwkv/ai00/RWKV-Runner), hf (a Hugging Face"
                   " directory: v4, v7), prepared (our runner's weights for --strategy).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="The output file (hf: a new or empty directory; onnx: the step graph, the others beside it).")
@click.option("--verify", "then_verify", is_flag=True, help="Verify the written files against SOURCE.")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(2, None), help="With --verify.")
@click.option("--runner", default="native", show_default=True, type=click.Choice(["native", "ours"]),
              help="With --verify: run the file in its format's runtime, or with rwkv-convert's reader.")
@state_option
def convert(source: str, target: str, layout, output: str, then_verify: bool, tokens: int, runner: str, state,
            **flags) -> None:
    """Convert SOURCE (original weights: .pth, safetensors, an HF directory, GGUF) for a runtime. Written
    tensor by tensor, atomically.

    \b
    Examples:
      rwkv-convert convert RWKV-x060-World-1B6.pth --to pip --strategy "cuda fp16i8" -o 1B6-fp16i8.pth
      rwkv-convert convert model.pth --to gguf --quant q8_0 -o model-q8_0.gguf --verify
      rwkv-convert convert model.pth --to safetensors --layout hf -o model-hf/
    """
    if target is None:
        target, layout = registry.target_for_output(output, layout)
    options = format_options(target, layout, flags)
    with recording() as published:  # the sizes this run wrote, even if another run replaces the files
        written = registry.convert(source, to=target, output=output, layout=layout, state=state, **options)
    for path in written:
        click.echo(f"wrote {path} ({published.get(path, path.stat().st_size):,} bytes)", err=True)
    if then_verify:
        _verify_and_exit(output, source, None, tokens, 0, False, None, runner, state=state)


convert.params.extend(FORMAT_FLAGS.values())


def _verify_and_exit(candidate, reference, strategy, tokens, seed, as_json, json_out, runner="native",
                     ln0_fold=None, state=None, trust_remote_code=False) -> None:
    with inputs(candidate, reference, state):
        check_json_out(json_out)
        report = verify(candidate, reference, strategy, tokens, seed, runner, ln0_fold, state, trust_remote_code)
        emit(format_report(report), report.to_dict(), as_json, json_out)
    sys.exit(0 if report.passed else 1)


@main.command("verify")
@click.argument("candidate", type=click.Path(dir_okay=True, path_type=str))
@click.option("--reference", required=True, type=click.Path(dir_okay=True, path_type=str),
              help="The original checkpoint CANDIDATE was made from.")
@click.option("--strategy", default=None,
              help="Strategy to run CANDIDATE with (converted files: the one they were made for).")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(2, None), help="Tokens per stream.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random token stream.")
@json_options
@click.option("--runner", default="native", show_default=True, type=click.Choice(["native", "ours"]),
              help="native: the runtime the format is for (the rwkv pip package for its files); ours: our reader.")
@click.option("--ln0-fold", default=None, type=click.Choice(LN0_FOLDS),
              help=LN0_HELP + " Default: the candidate's own (package for pip-converted files, else fp32).")
@state_option
@click.option("--trust-remote-code", is_flag=True,
              help="Run an HF directory's own *.py even where it is not the rwkv7-hf code rwkv-convert ships (off:"
                   " such a directory is refused). The verdict names it when used.")
def verify_command(candidate, reference, strategy, tokens, seed, as_json, json_out, runner, ln0_fold, state,
                   trust_remote_code) -> None:
    """Compare CANDIDATE's outputs with the reference runner on --reference: exit 0 pass, 1 fail, 2 bad input.

    Runs a fixed and a random token stream in sequence mode, token by token and in two chunks with the
    state carried, and reports max |Δlogit|, relative L2, KL, top-1 agreement and the state difference.
    Bounds: the table of the candidate's least precise weight scheme, widened to what that scheme itself
    does to this model (the reference run in the scheme); see docs/verification.md."""
    _verify_and_exit(candidate, reference, strategy, tokens, seed, as_json, json_out, runner, ln0_fold, state,
                     trust_remote_code)


@main.command("quality")
@click.argument("source", required=False, default=f"{BUNDLED_PREFIX}v7", type=click.Path(dir_okay=True, path_type=str))
@click.option("--text", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="The text to score (default: the bundled held-out text, Python standard-library modules).")
@click.option("--schemes", default=None,
              help=f"Comma-separated, from: {', '.join(quality.SCHEMES)}; or all (default:"
              f" {', '.join(quality.DEFAULT_SCHEMES)}; fp32 is always measured).")
@click.option("--full", is_flag=True, help=f"The larger default set ({len(quality.FULL_SCHEMES)} schemes: every GGUF"
              " block type, calibrated beside plain); a few minutes on the bundled model.")
@click.option("--window", default=1024, show_default=True, type=click.IntRange(2, None),
              help="Tokens per window; each window is scored from a fresh state.")
@click.option("--target-size", default=None,
              help="Also measure a GGUF whose per-tensor types are planned to this size (40%, 3.5MB).")
@click.option("--max-bytes", default=None, type=click.IntRange(1, None),
              help="Score only the text's first N bytes (default: 16384 for the default set, all with --full or"
                   " --schemes).")
@json_options
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also draw bytes per parameter against bits per byte into this PNG (needs matplotlib).")
@state_option
def quality_command(source, text, schemes, full, window, max_bytes, target_size, as_json, json_out, plot_path,
                    state) -> None:
    """What each precision and quantization of SOURCE (default the bundled trained RWKV-7) costs, each file run
    in its own runtime.

    For every scheme: export (prepared safetensors for our runner's strategies, GGUF for llama.cpp, ONNX for
    onnxruntime), run on the text, and report file bytes, bytes per parameter, bits per byte, KL from the fp32
    reference and top-1 agreement, in one table ordered by size. Schemes whose runtime is missing (GGUF
    without llama-cpp-python) are listed as not measured."""
    with inputs(source, text, state):
        for path in (json_out, plot_path):
            check_json_out(path)
        if json_out and plot_path and Path(json_out).absolute() == Path(plot_path).absolute():
            raise click.UsageError("--json-out and --plot name the same file; give each its own")
        if plot_path:
            quality.plotting()  # a missing matplotlib is said before the work, not after it
        if full and schemes:
            raise click.UsageError("--full is a set of schemes: give it or --schemes, not both")
        names = quality.parse_schemes(schemes, full)
        if max_bytes is None and not full and not schemes:  # the first look: a minute on the bundled model
            max_bytes = quality.QUICK_BYTES
        show = sys.stderr.isatty()
        progress = (lambda line: click.echo(f"{CLEAR_LINE}{line}", nl=False, err=True)) if show else \
            (lambda line: None if "window" in line else click.echo(line, err=True))
        report = quality.measure(source, text, names, window, max_bytes, progress, target_size, state)
        if show:
            click.echo(CLEAR_LINE, nl=False, err=True)
        emit(quality.table(report), report.to_json(), as_json, json_out)
        if plot_path:
            quality.plot(report, Path(plot_path))


@main.command("doctor")
@click.argument("checkpoint", required=False, type=click.Path(exists=True, dir_okay=False, path_type=str))
@json_options
@click.option("--where", default=".", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="The folder whose free disk space counts (where exports go).")
def doctor_command(checkpoint, as_json, json_out, where) -> None:
    """What this machine can do: torch and its GPU, the kernels, the runtimes each format is verified in, free
    memory and disk (against CHECKPOINT's size when given); each missing piece with the command that fixes it."""
    with inputs(checkpoint):
        check_json_out(json_out)
        checks = doctor.run_checks(checkpoint, where)
        emit(doctor.format_checks(checks), doctor.to_json(checks), as_json, json_out)


class ReleaseProgress:
    """Progress of a release on stderr: a redrawn bar on a terminal, a line per event in a log, nothing with
    --quiet."""

    def __init__(self, names: list[str], quiet: bool):
        self.names, self.done, self.running = names, 0, {}
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
            width = 24
            filled = width * self.done // max(len(self.names), 1)
            now = ", ".join(f"{n} {w}" for n, w in self.running.items())
            line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{len(self.names)} {now}"
            click.echo(f"{CLEAR_LINE}{line[:200]}", nl=False, err=True)
            if what != "started" and what not in ("building", "verifying", "quality"):
                click.echo(f"{CLEAR_LINE}{name}: {what}", err=True)

    def close(self) -> None:
        if self.mode == "bar":
            click.echo(CLEAR_LINE, nl=False, err=True)


@main.command("release")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", default="release", show_default=True, type=click.Path(file_okay=False, path_type=str),
              help="Where the artifacts, their keys (.rwkv-release/) and the reports go.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, None),
              help="Artifacts built and verified at once, each in a worker process.")
@click.option("--only", multiple=True, help="Only these artifacts (repeat the option, or separate names by commas).")
@click.option("--shard", default=None, help="K/N: build the K-th of N disjoint parts (CI matrices); join the parts'"
              " reports with --merge-reports.")
@click.option("--max-memory", default=None, help="Memory the running jobs may expect to use together (e.g. 8GB;"
              " default: 75% of the memory available now).")
@click.option("--reverify", is_flag=True, help="Verify up-to-date artifacts again instead of keeping their results.")
@click.option("--merge-reports", "merge", is_flag=True,
              help="FILES are the shards' JSON reports: join them into --out's reports.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@json_options
def release_command(files, out, jobs, only, shard, max_memory, reverify, merge, quiet, as_json, json_out) -> None:
    """Build every artifact of a release file (default: the bundled model's), verify each in its runtime, and
    write OUT/release-report.json, .xml (JUnit) and .md (a model card's table): exit 0 when all pass, 1 when
    any failed, 2 on bad input. Up-to-date artifacts are not rebuilt (docs/ci.md).

    \b
    Examples:
      rwkv-convert release                                  # the bundled model to every format
      rwkv-convert release models.toml --out dist --jobs 2
      rwkv-convert release models.toml --out dist --shard 2/4
      rwkv-convert release --merge-reports shard*/release-report-shard*.json --out dist
    """
    out_dir = Path(out)
    started = time.monotonic()
    if merge:
        read = list(files)
    else:
        if len(files) > 1:
            raise click.UsageError("give one release file (or --merge-reports with the shards' reports)")
        spec = release.parse_release(files[0] if files else str(release.bundled_release()))
        read = release.release_inputs(spec)
    # the reports may go anywhere but onto what the release reads or its key store
    with inputs(*read, out_dir / release.STAMPS):
        check_json_out(json_out)
        for path in release.report_paths(out_dir, None if merge else release.parse_shard(shard)).values():
            check_output(path)
    if merge:
        report = release.merge_reports(list(files))
        shard_k_n = None
    else:
        shard_k_n = release.parse_shard(shard)
        wanted = [n.strip() for item in only for n in item.split(",") if n.strip()]
        chosen, everything = release.select(spec, wanted, shard_k_n)
        budget = parse_size(max_memory, "--max-memory") if max_memory else release.default_memory_budget()
        jobs_list = release.plan_jobs(spec, chosen, out_dir.resolve(), reverify)
        out_dir.mkdir(parents=True, exist_ok=True)
        progress = ReleaseProgress([a.name for a in chosen], quiet)
        try:
            results = release.run_jobs(jobs_list, jobs, budget, progress)
        except (KeyboardInterrupt, Interrupted):
            progress.close()
            done = len(list((out_dir / release.STAMPS).glob("*.json")))
            click.echo(f"interrupted: {done} of {len(everything)} artifacts are whole in {out_dir}, no partial file"
                       " was left; run the same command again to finish", err=True)
            raise
        progress.close()
        report = release.build_report(spec, everything, shard_k_n, results, time.monotonic() - started)
    out_dir.mkdir(parents=True, exist_ok=True)
    with inputs(*read, out_dir / release.STAMPS):
        paths = release.write_reports(report, out_dir, shard_k_n)
        emit(release.table(report) + f"\nreports: {', '.join(str(p) for p in paths.values())}", report, as_json,
             json_out)
    sys.exit(release.exit_code(report))


@main.command("convert-state")
@click.argument("state", type=click.Path(dir_okay=False, path_type=str))
@click.option("--to", "layout", required=True, type=click.Choice(state_file.LAYOUTS),
              help="pth: BlinkDL's state .pth; safetensors: the same keys and layout; web-rwkv: F16 with the last two"
                   " axes swapped, as web-rwkv, ai00 and RWKV-Runner load it.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option("--model", default=None, type=click.Path(dir_okay=True, path_type=str),
              help="The base model the state is for: its shapes are checked against it.")
def convert_state(state: str, layout: str, output: str, model) -> None:
    """Write the state-tuning file STATE (any of the three forms) alone in the form a runtime loads.

    \b
    Examples:
      rwkv-convert convert-state rwkv-x060-state.pth --to web-rwkv -o state.st --model RWKV-x060-World-1B6.pth
      rwkv-convert convert-state state.st --to pth -o state.pth
    """
    loaded = state_file.read_state(state)
    spec = None
    if model is not None:
        spec = registry.read_checkpoint(model).spec
        state_file.check_fits(loaded, spec, model)
    with protecting(Path(state), *([Path(model)] if model else [])):
        path = state_file.write_state(loaded, Path(output), layout, spec)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes): {len(loaded.layers)} layers of {list(loaded.shape)}",
               err=True)


@main.command("make-fixture")
@click.argument("variant")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--layers", default=7, show_default=True, type=click.IntRange(1, None))
@click.option("-o", "--output", "directory", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Directory (default: the fixture cache).")
def make_fixture(variant: str, dtype: str, layers: int, directory) -> None:
    """Write a tiny deterministic test checkpoint (VARIANT: v4, v5.0, v5.1, v5.2, v5.2-state, v6, v7,
    v7-layer0-v, v7-deepembed, v7-dea) and print its path."""
    if variant not in VARIANTS + EXTRA_VARIANTS:
        choices = ", ".join(VARIANTS + EXTRA_VARIANTS)
        raise RwkvConvertError(f"unknown fixture variant {variant!r}; choose from {choices}")
    click.echo(fixture_path(variant, dtype, layers, directory))


if __name__ == "__main__":
    main()
