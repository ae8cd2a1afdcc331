"""Errors a user can cause and fix. The CLI prints them as one line and exits with code 2."""


class RwkvConvertError(Exception):
    """Bad input or usage: a missing file, a file that is not an RWKV checkpoint, a bad strategy."""

    exit_code = 2


class UnsupportedError(RwkvConvertError):
    """A valid request this version of rwkv-convert cannot carry out (say so, and what works instead)."""
