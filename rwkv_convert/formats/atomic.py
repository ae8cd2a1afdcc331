"""Atomic writes: a temp file in the target directory, then a rename; no partial file on failure."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RwkvConvertError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RwkvConvertError(f"cannot write {path}: {e.strerror or e}") from None
