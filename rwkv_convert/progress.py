"""Progress of long work. The library reports steps (`step("calibrating layers", 3, 24)`) and whoever asked
shows them (`showing(sink)`: the CLI draws a bar on a terminal and writes lines otherwise, always on stderr);
without a sink a step costs one context-variable read. Nothing here prints."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

Sink = Callable[[str, int, int], None]  # (what, done, total)

_SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("progress_sink", default=None)


@contextlib.contextmanager
def showing(sink: Sink) -> Iterator[None]:
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def step(what: str, done: int, total: int) -> None:
    sink = _SINK.get()
    if sink is not None:
        sink(what, done, total)
