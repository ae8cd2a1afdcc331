"""Errors a user can cause and fix. The CLI prints them as one line and exits with code 2."""

import zlib


class RwkvConvertError(Exception):
    """Bad input or usage: a missing file, a file that is not an RWKV checkpoint, a bad strategy."""

    exit_code = 2


class CastWarning(UserWarning):
    """A value the input holds more precisely than anything downstream can (fp64 weights): said once, as a note."""


class UnsupportedError(RwkvConvertError):
    """A valid request this version of rwkv-convert cannot carry out (say so, and what works instead)."""


def brief(text: object, limit: int = 200) -> str:
    """Another tool's error message for one of our lines: its first non-empty line, cut at a word boundary
    (never mid-word) with "..." when longer than `limit`."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else type(text).__name__
    if len(first) <= limit:
        return first
    cut = first[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + " ..."


def check_crc32(path: object, what: str, data, expected: int, keeper: str = "stored for them") -> None:
    """Refuse `data` (anything with the buffer protocol) whose CRC-32 is not `expected`: one wording for every
    file that carries checksums (zip records, our GGUF, safetensors and ONNX exports)."""
    if zlib.crc32(data) != expected:
        raise RwkvConvertError(f"{path}: the bytes of {what} do not match the CRC-32 {keeper}; the file is damaged"
                               " - copy, download or convert it again")
