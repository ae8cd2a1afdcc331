"""The CLI's commands for side files: an importance matrix, a state file alone, a test fixture (cli.py registers
them on the main group). Parsing and printing only: the work is the library's."""

from __future__ import annotations

import click

from . import cli_support as ui
from . import state_file
from .fixtures import check_variant, fixture_path
from .formats import gguf_imatrix, registry


@click.command("imatrix")
@click.argument("source", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The imatrix.gguf to write.")
@click.option("--calibration", default="bundled", show_default=True,
              help="The text run through the reference runner (a file, or bundled).")
@ui.adapter_options
def imatrix_command(source: str, output: str, calibration: str, adapters) -> None:
    """Write SOURCE's activation statistics on a calibration text as an importance matrix (imatrix.gguf) that
    llama.cpp's `llama-quantize --imatrix` reads. `convert --to gguf --imatrix FILE` reads llama-imatrix's.

    \b
    Example:
      rwkv-convert imatrix model.pth --calibration my-text.txt -o imatrix.gguf
      llama-quantize --imatrix imatrix.gguf model-f16.gguf model-q3_k_m.gguf Q3_K_M
    """
    inputs = [source] + ([calibration] if calibration != "bundled" else [])
    with ui.inputs(*inputs, *ui.adapter_paths(adapters)):
        path = gguf_imatrix.write_imatrix(registry.read_checkpoint(source, adapters=adapters), output, calibration)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)", err=True)


@click.command("convert-state")
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
    spec = registry.read_checkpoint(model).spec if model is not None else None
    path, loaded = state_file.convert_state(state, layout, output, spec, model)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes): {len(loaded.layers)} layers of {list(loaded.shape)}",
               err=True)


@click.command("make-fixture")
@click.argument("variant")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--layers", default=7, show_default=True, type=click.IntRange(1, None))
@click.option("-o", "--output", "directory", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Directory (default: the fixture cache).")
def make_fixture(variant: str, dtype: str, layers: int, directory) -> None:
    """Write a tiny deterministic test checkpoint (VARIANT: v4, v5.0, v5.1, v5.2, v5.2-state, v6, v7,
    v7-layer0-v, v7-deepembed, v7-dea) and print its path."""
    click.echo(fixture_path(check_variant(variant), dtype, layers, directory))


COMMANDS = (imatrix_command, convert_state, make_fixture)
