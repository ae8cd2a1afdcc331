"""What every client runtime declares: its name in verdicts, the package it needs and the command that installs
it. verify, quality, release and doctor ask these; nothing else spells a client's install line."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass

from ..errors import RwkvConvertError


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Client:
    """A program other than ours that runs our files (or one piece of it that has its own install)."""

    name: str  # as a verdict's runner line and doctor print it
    distribution: str  # pip's name, for its version
    module: str  # the import name whose absence means the client is missing
    purpose: str  # what it does for us, e.g. "runs GGUF files in llama.cpp (verify, quality)"
    install: str  # the command that installs it

    def version(self) -> str | None:
        """The installed version, or None when the module cannot be imported here."""
        return installed_version(self.distribution) if importlib.util.find_spec(self.module) is not None else None

    def imported(self, doing: str, instead: str = ""):
        """The client's module, or one line for the user who was `doing` something that needs it."""
        try:
            return importlib.import_module(self.module)
        except ImportError:
            raise RwkvConvertError(f"{doing} needs {self.distribution}: {self.install}"
                                   + (f" ({instead})" if instead else "")) from None


@dataclass(frozen=True)
class ClientRun:
    """A file run by the runtime its users run it in, on verify's token streams."""
    runner: str  # e.g. "llama.cpp (llama-cpp-python)"
    strategy: str  # what the candidate ran as
    outputs: dict[str, dict]  # stream name -> {"seq", "one", "split" logits [T, V]; "*_state" where known}
    schemes: set[str]  # tolerance keys of the weight types that ran (precision.BOUNDS: the precision table)
    # A strategy whose math our runner reproduces for this file exactly (the pip package's converted files:
    # the strategy they were made for), so verify can also compare it with the reference run that way.
    twin: str | None = None
