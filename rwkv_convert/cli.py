"""`rwkv-convert`: a thin Click layer over the library."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from . import __version__
from .errors import RwkvConvertError

NEOX_VOCABS = (50277, 50304)  # RWKV-4 Pile/Raven models (GPT-NeoX 20B tokenizer)


class Group(click.Group):
    """Turns errors a user can fix into one line on stderr and exit code 2 (`--debug` shows the trace)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RwkvConvertError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-convert")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Load, run and verify RWKV checkpoints (v4, v5.x, v6, v7).

    \b
    Examples:
      rwkv-convert inspect RWKV-x070-World-1.5B.pth
      rwkv-convert run RWKV-x070-World-1.5B.pth --prompt "User: hi" --tokens 50
      rwkv-convert run            # runs the bundled tiny default model
    """
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("path", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def inspect(path: str, as_json: bool) -> None:
    """Version, dimensions, LoRA ranks, dtypes and parameters of a checkpoint."""
    from .checkpoint import read_checkpoint
    from .describe import describe_checkpoint, format_description

    info = describe_checkpoint(read_checkpoint(path))
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@main.command()
@click.argument("path", required=False, type=click.Path(dir_okay=True, path_type=str))
@click.option("--prompt", default="\nUser: Hello!\n\nAssistant:", show_default=True, help="Text to continue.")
@click.option("--tokens", "max_tokens", default=64, show_default=True, type=click.IntRange(0, None),
              help="How many tokens to generate.")
@click.option("--strategy", default=None,
              help='e.g. "cpu fp32" (the default), "cpu bf16", "cpu fp32i8"; converted files use their own.')
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, None))
@click.option("--top-p", default=0.85, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--tokenizer", "tokenizer_file", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="A Hugging Face tokenizer.json (e.g. GPT-NeoX 20B for RWKV-4 Pile models) instead of World.")
def run(path, prompt, max_tokens, strategy, temperature, top_p, seed, tokenizer_file) -> None:
    """Generate text from PATH (or the bundled default model), streaming it as it is produced."""
    from . import load
    from .fixtures import DEFAULT_VARIANT, fixture_path
    from .generate import generate
    from .tokenizer import HFTokenizer, WorldTokenizer

    if path is None:
        path = str(fixture_path(DEFAULT_VARIANT))
        click.echo(f"(no model given: running the bundled tiny random-weight RWKV-7 model {path};"
                   " its text is gibberish by design)", err=True)
    model = load(path, strategy)
    vocab = model.spec.vocab_size
    if tokenizer_file:
        tokenizer = HFTokenizer(tokenizer_file)
    else:
        if vocab in NEOX_VOCABS:
            raise RwkvConvertError(f"this model has the GPT-NeoX vocabulary ({vocab} ids), not World; pass"
                                   " --tokenizer 20B_tokenizer.json")
        tokenizer = WorldTokenizer(vocab_size=vocab if vocab < 65536 else None)
    click.echo(prompt, nl=False)
    for piece in generate(model, tokenizer, prompt, max_tokens, temperature, top_p, seed):
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@click.argument("path", type=click.Path(dir_okay=True, path_type=str))
@click.option("--strategy", required=True, help='e.g. "cuda fp16i8 *10 -> cuda fp16".')
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def plan(path: str, strategy: str, as_json: bool) -> None:
    """Per-layer placement of a strategy on PATH: device, dtypes, weight scheme, streaming, memory."""
    from .checkpoint import read_checkpoint
    from .plan import format_plan, make_plan

    ckpt = read_checkpoint(path)
    result = make_plan(ckpt.spec, {k: tuple(v.shape) for k, v in ckpt.tensors.items()}, strategy)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_plan(result))


FORMATS = ("pip", "gguf", "onnx", "safetensors")


@main.command()
@click.argument("source", type=click.Path(dir_okay=True, path_type=str))
@click.option("--to", "target", required=True, type=click.Choice(FORMATS),
              help="pip: the rwkv pip package's converted .pth for one strategy; gguf: llama.cpp (v5.2, v6, v7);"
                   " onnx: onnxruntime step + sequence graphs (every version); safetensors: see --layout.")
@click.option("--strategy", default=None,
              help='pip: the strategy the file is made for (default "cpu fp32"); gguf: per-layer types'
                   " (fp32 -> F32, fp16 -> F16, bf16 -> BF16, any i8 -> Q8_0), instead of --quant.")
@click.option("--quant", default="f16", show_default=True,
              type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]),
              help="gguf: the type of the large matrices (norms, 1-D parameters and LoRAs stay F32).")
@click.option("--dtype", "out_dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="onnx: fp32 (default) or fp16 weights and activations (inputs, outputs and state stay fp32);"
                   " safetensors hf: the tensors' type (default: the source's); web-rwkv: fp16 only.")
@click.option("--layout", default=None, type=click.Choice(["web-rwkv", "hf", "prepared"]),
              help="safetensors: web-rwkv (.st for web-rwkv/ai00/RWKV-Runner), hf (a Hugging Face directory: v4,"
                   " v7), prepared (our runner's weights for --strategy, loaded without conversion work).")
@click.option("--shard-size", default="5GB", show_default=True,
              help="safetensors hf: largest shard (e.g. 500MB, 2GB); bigger models get an index.")
@click.option("--tokenizer", "tokenizer_json", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="safetensors hf: a tokenizer.json to ship (v4 Pile models); default the World vocabulary.")
@click.option("--onnx-quant", "onnx_quant", default="none", show_default=True,
              type=click.Choice(["none", "int8", "int4"]),
              help="onnx: block-quantize the layers' matrices with onnxruntime's MatMulNBits (embedding and head"
                   " keep --dtype).")
@click.option("--graph", "graphs", default="both", show_default=True, type=click.Choice(["both", "step", "sequence"]),
              help="onnx: the one-token step graph (OUT), the sequence graph (OUT with .seq.onnx), or both.")
@click.option("--logits", default="all", show_default=True, type=click.Choice(["all", "last"]),
              help="onnx: the sequence graph's logits for every position or only the last (faster prefill).")
@click.option("--external-data/--inline-data", default=None,
              help="onnx: weights in OUT.data beside the graphs (the default for two graphs, which share it, and"
                   " above protobuf's 2 GB limit) or inside the one graph written.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output file.")
@click.option("--verify", "then_verify", is_flag=True, help="Verify the written file against SOURCE.")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(2, None), help="With --verify.")
def convert(source: str, target: str, strategy, quant: str, out_dtype, layout, shard_size: str, tokenizer_json,
            onnx_quant: str, graphs: str, logits: str, external_data, output: str, then_verify: bool,
            tokens: int) -> None:
    """Convert SOURCE (an original .pth) for a runtime. Written tensor by tensor, atomically.

    \b
    Example:
      rwkv-convert convert RWKV-x060-World-1B6.pth --to pip --strategy "cuda fp16i8" -o 1B6-fp16i8.pth
    """
    if target == "onnx":
        from .formats.onnx.export import convert_to_onnx

        if strategy:
            raise click.UsageError("onnx takes --dtype and --onnx-quant, not --strategy")
        if out_dtype == "bf16":
            raise click.UsageError("onnx exports are fp32 or fp16 (--dtype bf16 is for safetensors hf)")
        written = convert_to_onnx(source, output, out_dtype or "fp32", onnx_quant, graphs, logits, external_data)
        for path in written:
            click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)", err=True)
        out, verify_strategy = written[0], None
    elif target == "safetensors":
        from .formats.safetensors_export import convert_to_safetensors

        if layout is None:
            raise click.UsageError("--to safetensors needs --layout web-rwkv, hf or prepared")
        written = convert_to_safetensors(source, output, layout, out_dtype, strategy, _size(shard_size),
                                         tokenizer_json)
        for path in written:
            click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)", err=True)
        out, verify_strategy = Path(output), None
    elif target == "gguf":
        from .formats.gguf_file import convert_to_gguf

        out = convert_to_gguf(source, output, quant, strategy)
        click.echo(f"wrote {out} ({out.stat().st_size:,} bytes), {strategy or quant}", err=True)
        verify_strategy = None
    else:
        from .formats.pip_pth import convert_to_pip

        verify_strategy = strategy = strategy or "cpu fp32"
        out = convert_to_pip(source, strategy, output)
        click.echo(f"wrote {out} ({out.stat().st_size:,} bytes) for strategy \"{strategy}\"", err=True)
    if then_verify:
        _verify_and_exit(str(out), source, verify_strategy, tokens, 0, None)


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 500MB or 2GB", param_hint="--shard-size")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def _verify_and_exit(candidate, reference, strategy, tokens, seed, json_path, runner="native") -> None:
    from .verify import format_report, verify, write_json

    report = verify(candidate, reference, strategy, tokens, seed, runner)
    click.echo(format_report(report))
    if json_path:
        write_json(report, json_path)
    sys.exit(0 if report.passed else 1)


@main.command("verify")
@click.argument("candidate", type=click.Path(dir_okay=True, path_type=str))
@click.option("--reference", required=True, type=click.Path(dir_okay=True, path_type=str),
              help="The original checkpoint CANDIDATE was made from.")
@click.option("--strategy", default=None,
              help="Strategy to run CANDIDATE with (converted files: the one they were made for).")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(2, None), help="Tokens per stream.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random token stream.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also write the report as JSON here.")
@click.option("--runner", default="native", show_default=True, type=click.Choice(["native", "ours"]),
              help="native: the runtime the format is for (the rwkv pip package for its files); ours: our reader.")
def verify_command(candidate, reference, strategy, tokens, seed, json_path, runner) -> None:
    """Compare CANDIDATE's outputs with the reference runner on SOURCE: exit 0 pass, 1 fail, 2 bad input.

    Runs a fixed and a random token stream in sequence mode, token by token and in two chunks with the
    state carried, and reports max |Δlogit|, relative L2, KL, top-1 agreement and the state difference
    against one tolerance table (by the candidate's least precise weight scheme)."""
    _verify_and_exit(candidate, reference, strategy, tokens, seed, json_path, runner)


@main.command("make-fixture")
@click.argument("variant")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--layers", default=7, show_default=True, type=click.IntRange(1, None))
@click.option("-o", "--output", "directory", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Directory (default: the fixture cache).")
def make_fixture(variant: str, dtype: str, layers: int, directory) -> None:
    """Write a tiny deterministic test checkpoint (VARIANT: v4, v5.0, v5.1, v5.2, v5.2-state, v6, v7,
    v7-layer0-v, v7-deepembed) and print its path."""
    from .fixtures import EXTRA_VARIANTS, VARIANTS, fixture_path

    if variant not in VARIANTS + EXTRA_VARIANTS:
        choices = ", ".join(VARIANTS + EXTRA_VARIANTS)
        raise RwkvConvertError(f"unknown fixture variant {variant!r}; choose from {choices}")
    click.echo(fixture_path(variant, dtype, layers, directory))


if __name__ == "__main__":
    main()
