"""The files beside an HF directory's weights: the generation config, the tokenizer's files (World's vocabulary, a
byte-level one, or a tokenizer.json), and the rwkv7-hf code with its licence, copied only where it is byte for byte
the code rwkv-convert ships (runtimes/hf_transformers.SHIPPED_CODE)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..errors import RwkvConvertError
from ..runtimes.hf_transformers import (
    SHIPPED_CODE,
    SHIPPED_FROM,
)
from ..tokenizer import (
    BYTE_TOKENS,
    HFTokenizer,
    gpt_neox_special_tokens,
    model_vocabulary,
    world_vocab_path,
)


def generation_config(cfg: dict) -> dict:
    """What save_pretrained writes beside config.json: the special ids generate() starts and stops with."""
    return {"_from_model_config": True, **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                          if k in cfg}, "output_attentions": False, "output_hidden_states": False,
            "use_cache": True}

WORLD_VOCAB = 65536  # ids in the World vocabulary's models


def write_tokenizer_files(directory: Path, spec, tokenizer_json: Path | None) -> None:
    """A given tokenizer.json (e.g. GPT-NeoX's 20B for the Pile models) as the fast tokenizer it is; else the
    World vocabulary with rwkv7-hf's RWKV7Tokenizer (its code beside it: AutoTokenizer finds it through
    auto_map, for v4 World models too)."""
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, directory / "tokenizer.json")
        special = gpt_neox_special_tokens(HFTokenizer(tokenizer_json).vocab())
        # PreTrainedTokenizerFast runs tokenizer.json as it is; GPTNeoXTokenizer (what model_type "rwkv" picks
        # without a tokenizer_config) rebuilds it from its own defaults
        write_json(directory / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "clean_up_tokenization_spaces": False, **special})
        write_json(directory / "special_tokens_map.json", special)
        return
    write_vocab_file(directory / "rwkv_vocab_v20230424.txt", spec.vocab_size)
    if not (directory / "tokenization_rwkv7.py").is_file():  # v4: the tokenizer's code alone
        shutil.copyfile(rwkv7_hf_folder() / "tokenization_rwkv7.py", directory / "tokenization_rwkv7.py")
    template = directory / "chat_template.jinja"  # the model code's (v7)
    tok = {"tokenizer_class": "RWKV7Tokenizer",
           "auto_map": {"AutoTokenizer": ["tokenization_rwkv7.RWKV7Tokenizer", None]},
           "model_vocab_size": spec.vocab_size, "pad_token": "<|padding|>", "eos_token": "<|endoftext|>",
           "errors": "replace",
           "chat_template": template.read_text(encoding="utf-8") if template.is_file() else None}
    write_json(directory / "tokenizer_config.json", tok)
    write_json(directory / "special_tokens_map.json", {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>"})


def write_vocab_file(path: Path, vocab_size: int) -> None:
    """RWKV7Tokenizer's vocabulary file: the World vocabulary for World-sized models; for byte-level ones (the
    bundled models, V=257) only its single bytes, ids 1..256, so that text never becomes ids the model lacks."""
    if model_vocabulary(vocab_size) == "world":
        shutil.copyfile(world_vocab_path(), path)
        return
    lines = [line for line in world_vocab_path().read_text(encoding="utf-8").splitlines()
             if line.strip() and int(line[:line.index(" ")]) < BYTE_TOKENS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

# RWKV-7 directories carry the model code that `trust_remote_code=True` runs, as rwkv7-hf's converter writes
# them by default: its self-contained implementation (needs only transformers to load), copied from the
# installed package. (Its other layout, three entrypoints importing rwkv7-hf, fails in generate() with
# transformers 5.24: RWKV7Config has no use_cache.)
REFERENCE_FILES = ("configuration_rwkv7.py", "cache_rwkv7.py", "ops_rwkv7.py", "modeling_rwkv7.py",
                   "tokenization_rwkv7.py", "chat_template.jinja")


def rwkv7_hf_folder() -> Path:
    try:
        import rwkv7_hf
    except ImportError:
        raise RwkvConvertError("an RWKV-7 Hugging Face directory carries rwkv7-hf's model code, copied from the"
                               " installed package: pip install rwkv7-hf") from None
    folder = Path(rwkv7_hf.__file__).parent
    missing = [name for name in REFERENCE_FILES if not (folder / name).is_file()]
    if missing:
        raise RwkvConvertError(f"the installed rwkv7-hf ({folder}) has no {missing[0]}; rwkv-convert copies the"
                               f" model code of {SHIPPED_FROM}: pip install rwkv7-hf==0.9.0")
    # the exports' code is the code verify runs without an opt-in: never another version's or an edited copy
    for name, digest in SHIPPED_CODE.items():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
            raise RwkvConvertError(f"the installed rwkv7-hf's {name} ({folder}) is not {SHIPPED_FROM}'s; exports"
                                   " carry that code: pip install --force-reinstall rwkv7-hf==0.9.0")
    return folder


def write_model_code(directory: Path) -> None:
    folder = rwkv7_hf_folder()
    for name in REFERENCE_FILES:
        shutil.copyfile(folder / name, directory / name)
    licence = _licence_file("rwkv7-hf")
    if licence is not None:  # MIT: the notice goes with the copied code
        shutil.copyfile(licence, directory / "LICENSE.rwkv7-hf")


def write_tokenizer_code(directory: Path) -> None:
    """rwkv7-hf's tokenizer code and chat template alone (for directories whose model code is not
    transformers', e.g. mlx-lm's), with its licence."""
    folder = rwkv7_hf_folder()
    for name in ("tokenization_rwkv7.py", "chat_template.jinja"):
        shutil.copyfile(folder / name, directory / name)
    licence = _licence_file("rwkv7-hf")
    if licence is not None:
        shutil.copyfile(licence, directory / "LICENSE.rwkv7-hf")


def _licence_file(distribution: str) -> Path | None:
    from importlib import metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f.name.upper().startswith("LICENSE")]
    return Path(found[0].locate()) if found else None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
