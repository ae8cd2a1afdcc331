"""The README's table "each format in its client": every row's convert line and load line, run as written in a
fresh shell, on small random models with the table's file names."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from rwkv_convert.fixtures import make_state_dict

from .conftest import gpt_neox_style_tokenizer, save_atomic

README = Path(__file__).resolve().parents[1] / "README.md"


def client_rows() -> list[tuple[str, str, str]]:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("<!-- clients -->"):text.index("<!-- /clients -->")]
    rows = []
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            code = [re.fullmatch(r"`(.*)`", c) for c in cells[2:]]
            rows.append((cells[0], code[0].group(1), code[1].group(1) if code[1] else ""))
    return rows


ROWS = client_rows()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    save_atomic(make_state_dict("v6", n_layer=2, n_embd=128, vocab=512), folder / "v6.pth")
    state = torch.Generator().manual_seed(5)
    save_atomic({f"blocks.{i}.att.time_state": torch.randn(2, 64, 64, generator=state) * 0.3 for i in range(2)},
                folder / "v6-state.pth")
    save_atomic(make_state_dict("v4", n_layer=2, n_embd=64, vocab=448), folder / "v4.pth")
    save_atomic(make_state_dict("v7", n_layer=2, n_embd=128, vocab=512), folder / "v7.pth")
    save_atomic(make_state_dict("v6", n_layer=2, n_embd=64, vocab=65536), folder / "v6-world.pth")
    gpt_neox_style_tokenizer(folder / "tokenizer.json")
    return folder


def test_the_table_has_every_format():
    assert [r[0] for r in ROWS] == ["pip `.pth`", "GGUF", "ONNX", "HF, RWKV-4", "HF, RWKV-7", "HF, RWKV-5.2/6",
                                    "prepared", "MLX, RWKV-7", "web-rwkv `.st`", "web-rwkv `.st` with a state"]


@pytest.mark.slow
@pytest.mark.parametrize("name,convert,load", ROWS, ids=[r[0] for r in ROWS])
def test_each_row_runs_as_written(name, convert, load, workdir):
    def shell(line: str):
        proc = subprocess.run(["bash", "-c", line], cwd=workdir, capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert proc.returncode == 0, (line, proc.stderr[-3000:])

    shell(convert)
    for module, required in (("web_rwkv_py", "RWKV_CONVERT_REQUIRE_WEB_RWKV"), ("mlx_lm", "RWKV_CONVERT_REQUIRE_MLX")):
        if module in load and importlib.util.find_spec(module) is None:
            if os.environ.get(required) == "1":
                pytest.fail(f"CI installs {module} (see .ci/run)")
            pytest.skip(f"{module} is not installed")
    if load.startswith("python convert_hf_to_gguf.py"):  # llama.cpp's converter, from its source (see .ci/run)
        converter = os.environ.get("RWKV_CONVERT_LLAMA_CONVERTER")
        if not converter:
            if os.environ.get("RWKV_CONVERT_REQUIRE_LLAMA") == "1":
                pytest.fail("CI must set RWKV_CONVERT_LLAMA_CONVERTER (see .ci/run)")
            pytest.skip("RWKV_CONVERT_LLAMA_CONVERTER (llama.cpp's convert_hf_to_gguf.py) not set")
        load = load.replace("convert_hf_to_gguf.py", converter)
    elif not load.startswith("python"):  # a client not run here: the file must at least read back
        output = convert.split(" -o ")[-1]
        load = f"python -c 'import rwkv_convert; rwkv_convert.load(\"{output}\")'"
    shell(load)
