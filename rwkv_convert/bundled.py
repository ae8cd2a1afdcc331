"""Files shipped inside the package: the small trained models and the texts they are measured on
(rwkv_convert/trained; made by scripts/train_tiny.py, on Python's standard library under the PSF License)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import RwkvConvertError

TRAINED_MODELS = {"v7": "rwkv7-stdlib-L3-C256.pth", "v6": "rwkv6-stdlib-L3-C256.pth"}
HELD_OUT_TEXT = "heldout.txt"  # standard-library modules left out of training
CALIBRATION_TEXT = "calibration.txt"  # others, also left out: for calibrating quantization
DEFAULT_PROMPT = "class "  # what the trained models' corpus (Python source) starts a line with


def bundled_file(name: str) -> Path:
    path = Path(str(resources.files("rwkv_convert") / "trained" / name))
    if not path.is_file():
        raise RwkvConvertError(f"the bundled file {name} is missing from {path.parent}: reinstall rwkv-convert")
    return path


def trained_model(version: str = "v7") -> Path:
    """The bundled trained model of `version` (v7 or v6): 3 layers, C256, byte-level (257 ids)."""
    if version not in TRAINED_MODELS:
        raise RwkvConvertError(f"no bundled trained {version} model; choose from {', '.join(TRAINED_MODELS)}")
    return bundled_file(TRAINED_MODELS[version])


BUNDLED_PREFIX = "bundled:"  # "bundled:v7", wherever a model's path is taken: the trained model shipped here


def model_path(path) -> Path:
    """A model path as given, with bundled:NAME naming a bundled trained model."""
    text = str(path)
    if not text.startswith(BUNDLED_PREFIX):
        return Path(path)
    name = text.removeprefix(BUNDLED_PREFIX)
    if name not in TRAINED_MODELS:
        raise RwkvConvertError(f"unknown bundled model {text!r}; choose from"
                               f" {', '.join(BUNDLED_PREFIX + v for v in TRAINED_MODELS)}")
    return trained_model(name)
