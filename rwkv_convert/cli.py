"""`rwkv-convert`: a thin Click layer over the library."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from . import __version__, cli_files, doctor, quality, release
from . import cli_support as ui
from .atomic import recording
from .bundled import BUNDLED_PREFIX, DEFAULT_PROMPT
from .describe import describe_path, format_description
from .formats import registry
from .generate import CHAT_PROMPT, generate, prepare_run
from .plan import format_plan, make_plan
from .prepare import LN0_FOLDS
from .units import parse_size
from .verify import format_report, verify


@click.group(cls=ui.Group, context_settings={"help_option_names": ["-h", "--help"]})
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
    warnings.showwarning = ui.show_warning


@main.command()
@click.argument("path", required=False, default=f"{BUNDLED_PREFIX}v7", type=click.Path(dir_okay=True, path_type=str))
@ui.json_options
@ui.adapter_options
def inspect(path: str, as_json: bool, json_out, adapters) -> None:
    """Version, dimensions, LoRA ranks, dtypes and parameters of a checkpoint (PATH; default the bundled trained
    RWKV-7, bundled:v7), with --lora the model they make; or of a fine-tuning adapter file alone (its kind, rank,
    targets, replaced tensors and the model shapes it fits)."""
    with ui.reporting(json_out, path, *ui.adapter_paths(adapters)):
        info = describe_path(path, adapters)
        ui.emit(format_description(info), info, as_json, json_out)


@main.command()
@click.argument("path", required=False, type=click.Path(dir_okay=True, path_type=str))
@click.option("--prompt", default=None, callback=ui.unescaped,
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
@click.option("--ln0-fold", default="fp32", show_default=True, type=click.Choice(LN0_FOLDS), help=ui.LN0_HELP)
@ui.state_option
@ui.adapter_options
def run(path, prompt, max_tokens, strategy, temperature, top_p, seed, tokenizer_file, ln0_fold, state,
        adapters) -> None:
    """Generate text from PATH (or the bundled default model), streaming it as it is produced."""
    setup = prepare_run(path, prompt, strategy, ln0_fold, state, tokenizer_file, adapters)
    for note in setup.notes:
        click.echo(note, err=True)
    ui.stream(setup.prompt, generate(setup.model, setup.tokenizer, setup.prompt, max_tokens, temperature, top_p, seed))


@main.command()
@click.argument("path", required=False, default=f"{BUNDLED_PREFIX}v7", type=click.Path(dir_okay=True, path_type=str))
@click.option("--strategy", default="cpu fp32", show_default=True, help='e.g. "cuda fp16i8 *10 -> cuda fp16".')
@ui.json_options
@ui.adapter_options
def plan(path: str, strategy: str, as_json: bool, json_out, adapters) -> None:
    """Per-layer placement of a strategy on PATH (default the bundled trained RWKV-7, bundled:v7): device, dtypes,
    weight scheme, streaming, memory."""
    with ui.reporting(json_out, path):
        ckpt = registry.read_checkpoint(path, adapters=adapters)
        result = make_plan(ckpt.spec, ckpt.shapes, strategy)
        ui.emit(format_plan(result), result.to_dict(), as_json, json_out)


@main.command(cls=ui.ConvertCommand)
@click.argument("source", type=click.Path(dir_okay=True, path_type=str))
@click.option("--to", "target", default=None, type=click.Choice(registry.targets()),
              help="The format to write (its options are listed under it below): web-rwkv is the .st for"
                   " web-rwkv/ai00/RWKV-Runner, hf a Hugging Face directory, prepared our runner's weights for"
                   " --strategy. Default: from -o's suffix (.gguf, .onnx, .st for web-rwkv, .pth for the pip package).")
@click.option("--layout", default=None, type=click.Choice([f.name for f in registry.writers() if f.family]),
              help="The older spelling of the safetensors formats: --to safetensors --layout hf is --to hf.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="The output file (hf: a new or empty directory; onnx: the step graph, the others beside it).")
@click.option("--verify", "then_verify", is_flag=True, help="Verify the written files against SOURCE.")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(2, None), help="With --verify.")
@ui.runner_option("With --verify: run the file in its format's runtime, or with rwkv-convert's reader.")
@ui.state_option
@ui.adapter_options
def convert(source: str, target: str, layout, output: str, then_verify: bool, tokens: int, runner: str, state,
            adapters, **flags) -> None:
    """Convert SOURCE (original weights: .pth, safetensors, an HF directory, GGUF) for a runtime. Written
    tensor by tensor, atomically.

    \b
    Examples:
      rwkv-convert convert RWKV-x060-World-1B6.pth --to pip --strategy "cuda fp16i8" -o 1B6-fp16i8.pth
      rwkv-convert convert model.pth --to gguf --quant q8_0 -o model-q8_0.gguf --verify
      rwkv-convert convert model.pth --to hf -o model-hf/
      rwkv-convert convert base.pth --lora rwkv-0.pth --lora-alpha 32 --to gguf -o ft.gguf --verify
    """
    if target is None:
        target, layout = registry.target_for_output(output, layout)
    options = ui.format_options(target, layout, flags)
    with recording() as published:  # the sizes this run wrote, even if another run replaces the files
        written = registry.convert(source, to=target, output=output, layout=layout, state=state, adapters=adapters,
                                   **options)
    for path in written:
        click.echo(f"wrote {path} ({published.get(path, path.stat().st_size):,} bytes)", err=True)
    if then_verify:
        _verify_and_exit(output, source, None, tokens, 0, False, None, runner, state=state, adapters=adapters)


def _verify_and_exit(candidate, reference, strategy, tokens, seed, as_json, json_out, runner="client",
                     ln0_fold=None, state=None, trust_remote_code=False, adapters=()) -> None:
    with ui.reporting(json_out, candidate, reference, state, *ui.adapter_paths(adapters)):
        report = verify(candidate, reference, strategy, tokens, seed, runner, ln0_fold, state, trust_remote_code,
                        adapters)
        ui.emit(format_report(report), report.to_dict(), as_json, json_out)
    sys.exit(0 if report.passed else 1)


@main.command("verify")
@click.argument("candidate", type=click.Path(dir_okay=True, path_type=str))
@click.option("--reference", required=True, type=click.Path(dir_okay=True, path_type=str),
              help="The original checkpoint CANDIDATE was made from.")
@click.option("--strategy", default=None,
              help="Strategy to run CANDIDATE with (converted files: the one they were made for).")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(2, None), help="Tokens per stream.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random token stream.")
@ui.json_options
@ui.runner_option("client: the runtime the format is for (the rwkv pip package for its files); ours: our reader.")
@click.option("--ln0-fold", default=None, type=click.Choice(LN0_FOLDS),
              help=ui.LN0_HELP + " Default: the candidate's own (package for pip-converted files, else fp32).")
@ui.state_option
@click.option("--trust-remote-code", is_flag=True,
              help="Run an HF directory's own *.py even where it is not the rwkv7-hf code rwkv-convert ships (off:"
                   " such a directory is refused). The verdict names it when used.")
@ui.adapter_options
def verify_command(candidate, reference, strategy, tokens, seed, as_json, json_out, runner, ln0_fold, state,
                   trust_remote_code, adapters) -> None:
    """Compare CANDIDATE's outputs with the reference runner on --reference: exit 0 pass, 1 fail, 2 bad input.

    Runs a fixed and a random token stream in sequence mode, token by token and in two chunks with the
    state carried, and reports max |Δlogit|, relative L2, KL, top-1 agreement and the state difference.
    Bounds: the table of the candidate's least precise weight scheme, widened to what that scheme itself
    does to this model (the reference run in the scheme); see docs/verification.md."""
    _verify_and_exit(candidate, reference, strategy, tokens, seed, as_json, json_out, runner, ln0_fold, state,
                     trust_remote_code, adapters)


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
@ui.json_options
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also draw bytes per parameter against bits per byte into this PNG (needs matplotlib).")
@ui.state_option
@ui.adapter_options
def quality_command(source, text, schemes, full, window, max_bytes, target_size, as_json, json_out, plot_path,
                    state, adapters) -> None:
    """What each precision and quantization of SOURCE (default the bundled trained RWKV-7) costs, each file run
    in its own runtime.

    For every scheme: export (prepared safetensors for our runner's strategies, GGUF for llama.cpp, ONNX for
    onnxruntime), run on the text, and report file bytes, bytes per parameter, bits per byte, KL from the fp32
    reference and top-1 agreement, in one table ordered by size. Schemes whose runtime is missing (GGUF
    without llama-cpp-python) are listed as not measured."""
    with ui.inputs(source, text, state, *ui.adapter_paths(adapters)):
        ui.check_reports({"--json-out": json_out, "--plot": plot_path})
        if plot_path:
            quality.plotting()  # a missing matplotlib is said before the work, not after it
        names, max_bytes = quality.choose(schemes, full, max_bytes)
        with ui.line_progress() as progress:
            report = quality.measure(source, text, names, window, max_bytes, progress, target_size, state,
                                     adapters)
        ui.emit(quality.table(report), report.to_json(), as_json, json_out)
        if plot_path:
            quality.plot(report, Path(plot_path))


@main.command("doctor")
@click.argument("checkpoint", required=False, type=click.Path(exists=True, dir_okay=False, path_type=str))
@ui.json_options
@click.option("--where", default=".", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="The folder whose free disk space counts (where exports go).")
def doctor_command(checkpoint, as_json, json_out, where) -> None:
    """What this machine can do: torch and its GPU, the kernels, the runtimes each format is verified in, free
    memory and disk (against CHECKPOINT's size when given); each missing piece with the command that fixes it."""
    with ui.reporting(json_out, checkpoint):
        checks = doctor.run_checks(checkpoint, where)
        ui.emit(doctor.format_checks(checks), doctor.to_json(checks), as_json, json_out)


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
@ui.json_options
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
    request = release.open_release(list(files), out_dir, merge, shard, only)
    with ui.reporting(json_out, *request.reads, out_dir / release.STAMPS):  # not onto its inputs or key store
        release.check_reports(request)
    budget = parse_size(max_memory, "--max-memory") if max_memory else None
    names = [a.name for a in request.chosen]
    with ui.ReleaseProgress(names, quiet, lambda: release.interrupted_line(request, out_dir)) as progress:
        report = release.run_release(request, out_dir, jobs, budget, reverify, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ui.inputs(*request.reads, out_dir / release.STAMPS):
        paths = release.write_reports(report, out_dir, request.shard)
        ui.emit(release.table(report) + f"\nreports: {', '.join(str(p) for p in paths.values())}", report, as_json,
             json_out)
    sys.exit(release.exit_code(report))


for _command in cli_files.COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main()
