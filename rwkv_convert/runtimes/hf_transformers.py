"""Running a Hugging Face export the way its users load it: AutoModelForCausalLM (RWKV-4: transformers' own
RwkvForCausalLM; RWKV-7: the rwkv7-hf code shipped in the directory, trust_remote_code), on the CPU in fp32,
the state carried through the model's cache between calls.

A directory's code runs only if it is byte-identical to the rwkv7-hf 0.9.0 files our exports carry (SHIPPED_CODE)
and its auto_map is ours; anything else is refused unless the user opts in (`trusting_remote_code`, the CLI's
--trust-remote-code). transformers is handed a private view of the directory (client_files): the checked code
and configs as copies of the bytes we checked, the weights as the open files, and no pytorch_model.bin."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..client_files import client_view, weights_only_here
from ..errors import RwkvConvertError, brief
from ..precision import float_bound
from .base import Client

CLIENT = Client("transformers", "transformers", "transformers", "loads --to hf exports of RWKV-4",
                "pip install 'transformers>=4.56'")
RWKV7_HF = Client("rwkv7-hf", "rwkv7-hf", "rwkv7_hf", "runs --to hf exports of RWKV-7",
                  "pip install rwkv7-hf==0.9.0")

# model_type in config.json -> how the model hands its state back and takes it again
CARRIED = {"rwkv": ("state", "state"), "rwkv7": ("past_key_values", "past_key_values")}

# The model code RWKV-7 exports carry: rwkv7-hf 0.9.0's self-contained implementation, by SHA-256. The writer
# copies these from the installed package and refuses another version's; the runner runs only these.
SHIPPED_CODE = {
    "configuration_rwkv7.py": "6b1b07047312e1fb9f63e501e9f5939f3d7e1d9ebf9b9ff526e1ac651a169726",
    "cache_rwkv7.py": "8d2cc30f05d04eca4521026b1cb4683001c6f3e625a39e30451c74df092ba99b",
    "ops_rwkv7.py": "4045c41a7b64d37218a823ce2d79177c1ff96f349b47a9616f1e8080a25b77fd",
    "modeling_rwkv7.py": "0ec25a30ff686ca2e8e97d83d0e9db8a584cbe2552bfca5cb0b2bdc52e8775cc",
    "tokenization_rwkv7.py": "b08da37df93e51806ad78985834286050da465251e9d3e04598e4a69d05280dd",
}
SHIPPED_FROM = "rwkv7-hf 0.9.0"
AUTO_MAP = {"AutoConfig": "configuration_rwkv7.RWKV7Config", "AutoModel": "modeling_rwkv7.RWKV7Model",
            "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM"}
# what transformers reads to build the model; tokenizer files are not loaded here
VIEWED_FILES = ("config.json", "generation_config.json")
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
TRUST_OPTION = "--trust-remote-code"

_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_remote_code", default=False)


@contextlib.contextmanager
def trusting_remote_code(trusted: bool = True) -> Iterator[None]:
    """Within the block, an HF directory's own code runs even where it is not the code we ship (the user's opt-in)."""
    token = _TRUSTED.set(trusted)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise RwkvConvertError(f"cannot read {path}: {e.strerror or e}") from None


def checked_code(directory: Path, trusted: bool, config: bytes) -> dict[str, bytes]:
    """The directory's code files (name -> bytes), each the copy we ship, and its config's auto_map ours; with
    `trusted`, whatever it holds. One line naming the first file that differs otherwise. config: config.json's
    bytes as read once (the auto_map checked is the one handed to transformers)."""
    directory = Path(directory)
    code = {}
    for path in sorted(directory.rglob("*.py")):
        name = str(path.relative_to(directory))
        data = _read(path)
        if not trusted and SHIPPED_CODE.get(name) != hashlib.sha256(data).hexdigest():
            what = "is not a file" if name not in SHIPPED_CODE else "differs from the copy"
            raise RwkvConvertError(f"{path} {what} rwkv-convert ships ({SHIPPED_FROM}'s model code); refusing to run"
                                   f" code from the model directory - pass {TRUST_OPTION} to run it anyway")
        code[name] = data
    try:
        auto_map = json.loads(config).get("auto_map")
    except (ValueError, AttributeError):
        auto_map = None  # the reader has refused a bad config.json before the runtime gets the directory
    if not trusted and auto_map is not None and auto_map != AUTO_MAP:
        raise RwkvConvertError(f"{directory}/config.json maps the model to other code ({auto_map!r}) than"
                               f" {SHIPPED_FROM}'s; refusing to run it - pass {TRUST_OPTION} to run it anyway")
    return code


def model_type(directory: Path) -> str | None:
    try:
        return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def runs_in_transformers(directory: Path) -> bool:
    """RWKV-4 and RWKV-7 directories have a transformers client; v5.2/v6 ones are for llama.cpp's converter."""
    return model_type(directory) in CARRIED


def stored_scheme(directory: Path) -> str:
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    return float_bound(str(config.get("dtype") or config.get("torch_dtype") or "float32"))


class TransformersSession:
    """An HF directory opened in transformers: a runtimes.base.Session."""

    def __init__(self, directory: Path):
        CLIENT.imported("running HF exports", "or verify with --runner ours")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        self.kind = model_type(directory)
        self.trusted = _TRUSTED.get()
        viewed = {k: _read(directory / k) for k in VIEWED_FILES if (directory / k).is_file()}
        code = checked_code(directory, self.trusted, viewed.get("config.json", b"{}"))  # the bytes handed on
        logging.set_verbosity_error()  # its load bars and deprecation notes would bury verify's own lines
        logging.disable_progress_bar()
        # transformers keeps a copy of remote code per folder name: the checked code always under one name
        name = "rwkv7_checked" if not self.trusted else "rwkv7_trusted_" + hashlib.sha256(
            b"".join(code.values())).hexdigest()[:12]
        copies = {f"{name}/{k}": v for k, v in code.items()}
        copies |= {f"{name}/{k}": v for k, v in viewed.items()}
        weights = {f"{name}/{k}": directory / k for k in _weight_files(directory)}
        try:
            with client_view(weights, copies) as view, weights_only_here():
                self.model = AutoModelForCausalLM.from_pretrained(
                    str(view.path(name)), trust_remote_code=self.kind == "rwkv7", dtype=torch.float32,
                    use_safetensors=True).eval()
        except RwkvConvertError:
            raise
        except Exception as e:  # transformers raises many kinds on a bad directory or missing remote code
            raise RwkvConvertError(f"transformers could not load {directory}: {brief(e)}") from None

    def logits(self, chunks: list[list[int]]) -> torch.Tensor:
        """[T, V] fp32 logits of every token, fed chunk by chunk with the state carried, from a fresh state."""
        given, returned = CARRIED[self.kind]
        carried, rows = None, []
        with torch.no_grad():
            for chunk in chunks:
                kwargs = {given: carried} if carried is not None else {}
                out = self.model(torch.tensor([chunk]), use_cache=True, **kwargs)
                carried = getattr(out, returned)
                rows.append(out.logits[0].float())
        return torch.cat(rows)


def _weight_files(directory: Path) -> list[str]:
    """The safetensors files transformers reads (one file, or an index and its shards; no pickled .bin)."""
    if (directory / INDEX_NAME).is_file():
        try:
            weight_map = json.loads(_read(directory / INDEX_NAME)).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
        except (ValueError, AttributeError, TypeError):
            raise RwkvConvertError(f"{directory}/{INDEX_NAME} has no weight_map of tensor names to files") from None
        bad = [f for f in shards if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith(".")]
        if bad:
            raise RwkvConvertError(f"{directory}/{INDEX_NAME} names a shard outside the directory: {bad[0]!r}")
        return [INDEX_NAME, *shards]
    return [WEIGHTS_NAME]
