"""Shared test set-up: fixture files in a per-session cache, and the `rwkv` pip package as the oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rwkv_convert.fixtures import VARIANTS, fixture_path, make_state_dict
from rwkv_convert.runtimes.pip_package import run_in_pip_package

N_TOKENS, SPLIT = 64, 20
# The seed of the CUDA kernels' CPU-build tests (inputs and thread schedules), printed in pytest's header
KERNEL_TEST_SEED = int(os.environ.get("RWKV_CONVERT_TEST_SEED") or 20261206)


def pytest_report_header(config):
    return f"CUDA kernels on the CPU: seed {KERNEL_TEST_SEED} (RWKV_CONVERT_TEST_SEED=<n> for another)"

# Shapes the standard fixtures do not have: other widths, head counts, layer counts, vocabularies, ranks.
ODD_SHAPES = {
    "v4-C96-V300-L2": ("v4", dict(n_layer=2, n_embd=96, vocab=300)),
    "v5.2-C256-L1": ("v5.2", dict(n_layer=1, n_embd=256, vocab=512)),
    "v6-C192-V1000-L2": ("v6", dict(n_layer=2, n_embd=192, vocab=1000, ranks={"maa": 16, "decay": 40})),
    "v7-C192-V1000-L3": ("v7", dict(n_layer=3, n_embd=192, vocab=1000, ranks={"w": 8, "a": 12, "v": 20, "g": 28})),
}


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fixtures")
    os.environ["RWKV_CONVERT_CACHE"] = str(path)  # the CLI's default model goes here too
    return path


def tokens_for(vocab: int, seed: int = 1234) -> list[int]:
    return torch.randint(0, vocab, (N_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()


def save_atomic(sd: dict, path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return path


TOKENIZER_TEXT = ["The quick brown fox jumps over the lazy dog. " * 4, "Pile models read text through GPT-NeoX's BPE,",
                  "numbers 12345 and 3.14159, tabs\t and  spaces", "ünïcödé café naïve 你好世界 🙂"] * 40


def gpt_neox_style_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A tokenizer.json shaped like GPT-NeoX's 20B (the Pile models'): NFC normalizer, byte-level BPE,
    <|endoftext|> and <|padding|> as added tokens; trained here on a few lines (the real file is 3.5 MB)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def neox_tokenizer(tmp_path_factory) -> Path:
    return gpt_neox_style_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


class Oracle:
    """Results of the pip package for named jobs, computed in two subprocesses the first time asked."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.jobs: dict[str, dict] = {}
        self.results: dict[str, dict] | None = None
        for variant in VARIANTS:
            for dtype in ("fp32", "bf16"):
                self.add(f"{variant}/{dtype}", fixture_path(variant, dtype, directory=directory), 512)
            if not variant.startswith("v7"):
                # The bf16 file's values in fp32: shows the bf16 difference comes only from the ln0 fold.
                sd = torch.load(fixture_path(variant, "bf16", directory=directory), weights_only=True)
                path = save_atomic({k: v.float() for k, v in sd.items()}, directory / f"upcast-{variant}.pth")
                self.add(f"{variant}/upcast", path, 512)
        for name, (variant, kw) in ODD_SHAPES.items():
            sd = make_state_dict(variant, **kw)
            # The package detects versions from key order and sets n_head only if it has seen ln_x before
            # time_decay: put those keys first so that it can run a 1-layer v5.2 file at all.
            sd = dict(sorted(sd.items(), key=lambda kv: 0 if "ln_x" in kv[0] or "gate" in kv[0] else 1))
            self.add(name, save_atomic(sd, directory / f"odd-{name}.pth"), kw["vocab"])

    def add(self, name: str, path: Path, vocab: int) -> None:
        self.jobs[name] = {"path": str(path), "strategy": "cpu fp32", "tokens": tokens_for(vocab), "split": SPLIT}

    def _run(self) -> dict[str, dict]:
        results = {}
        for v7 in (True, False):
            names = [n for n in self.jobs if n.startswith("v7") == v7]
            results.update(zip(names, run_in_pip_package([self.jobs[n] for n in names], v7=v7), strict=True))
        return results

    def __getitem__(self, name: str) -> dict:
        if self.results is None:
            self.results = self._run()
        return self.results[name]


@pytest.fixture(scope="session")
def oracle(fixture_dir) -> Oracle:
    return Oracle(fixture_dir)
