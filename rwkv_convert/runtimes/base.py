"""What every runtime declares and does. A `Client` says its name in verdicts, the package it needs and the
command that installs it (verify, quality, release and doctor ask these; nothing else spells an install line).
A `Session` is one file opened in a runtime: logits of tokens fed chunk by chunk with the state carried, from a
fresh state; `verify_modes` runs verify's three ways of feeding a stream through any session."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import RwkvConvertError

# verify's --runner: "client" runs a file in the runtime its format is for, "ours" in our runner. "native" is
# client's name from before the C kernels took that word (still accepted).
RUNNERS = ("client", "ours")
RUNNER_ALIASES = {"native": "client"}


def runner_named(word: str) -> str:
    """The runner a --runner word names, or one line listing the words."""
    runner = RUNNER_ALIASES.get(word, word)
    if runner not in RUNNERS:
        raise RwkvConvertError(f"unknown runner {word!r}; use client (the format's own runtime) or ours")
    return runner


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

    def check_installed(self) -> None:
        """NoClient, where the client is not installed here: verify then runs our reader and says why."""
        if self.version() is None:
            raise NoClient(f"{self.distribution} is not installed: {self.install}")

    def imported(self, doing: str, instead: str = ""):
        """The client's module, or one line for the user who was `doing` something that needs it."""
        try:
            return importlib.import_module(self.module)
        except ImportError:
            raise RwkvConvertError(f"{doing} needs {self.distribution}: {self.install}"
                                   + (f" ({instead})" if instead else "")) from None


class NoClient(RwkvConvertError):
    """The file's client cannot run it here (not installed, or not this version): our reader runs it instead, and
    the verdict says so with this reason, never a bare PASS."""


class ClientFailed(RwkvConvertError):
    """The client could not run the file (a panic, an abort, an error): a failed verification, not ours."""


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
    # mode key ("one", ...) -> the positions its rows are of, where a client gives fewer than every position
    positions: dict[str, list[int]] = field(default_factory=dict)
    note: str = ""  # why the file's own client did not run it (NoClient), said in the verdict
    failure: str = ""  # the client could not run the file (a panic, an error): a failed verification


class Session(Protocol):
    """One file opened in a runtime (ours: runtimes/ours.py; llama.cpp, transformers, onnxruntime, ...)."""

    def logits(self, chunks: list[list[int]]) -> torch.Tensor:
        """[T, V] fp32 logits of every token of the chunks, fed in order with the state carried, from a fresh
        state (T: all the chunks' tokens)."""
        ...


def verify_modes(session: Session, tokens: list[int], split: int) -> dict[str, torch.Tensor]:
    """The ways verify feeds one stream: one batch ("seq"), one token at a time ("one"), and two chunks with the
    state carried across `split` ("split"). A client that disagrees between them carries its state wrongly."""
    return {"seq": session.logits([tokens]), "one": session.logits([[t] for t in tokens]),
            "split": session.logits([tokens[:split], tokens[split:]])}
