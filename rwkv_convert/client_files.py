"""What a third-party loader (the rwkv pip package, transformers, llama.cpp, onnxruntime) is handed: only files
we have checked, under names we chose, in a folder we own, with an environment that keeps torch weights-only.

Clients do things with a name that we do not: the pip package strips whitespace and appends ".pth" (so
`verify cand.bin` would load a `cand.bin.pth` beside it), and transformers imports the `*.py` it finds. So a
client never gets the user's path: `client_view` opens each checked file once and links it, under our own
name, into a private folder as /proc/self/fd/N, the open file itself (a rename or swap of the user's path
afterwards changes nothing), and the client reads that. The fds are inherited by a client subprocess at the
same numbers (pass `view.fds` to subprocess's pass_fds)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RwkvConvertError

# torch.load without weights_only unpickles arbitrary code unless forced; the second variable would undo that
WEIGHTS_ONLY_ENV = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}
UNSAFE_ENV = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",)


def client_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a client process: the caller's, less what turns weights-only loading off, plus
    what forces it on."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in UNSAFE_ENV}
    return env | WEIGHTS_ONLY_ENV


@contextlib.contextmanager
def weights_only_here() -> Iterator[None]:
    """The same for a client that runs in this process (transformers): torch reads these at every load."""
    saved = {k: os.environ.get(k) for k in (*UNSAFE_ENV, *WEIGHTS_ONLY_ENV)}
    for k in UNSAFE_ENV:
        os.environ.pop(k, None)
    os.environ.update(WEIGHTS_ONLY_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class ClientView:
    folder: Path
    fds: list[int] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.folder / name


_PROC_FD = Path("/proc/self/fd")


@contextlib.contextmanager
def client_view(files: dict[str, Path], copies: dict[str, bytes] | None = None) -> Iterator[ClientView]:
    """A private folder holding `files` (our name -> the user's file, already checked by our reader) and
    `copies` (our name -> bytes written as a file: small files whose content we checked, like code and
    configs). Names may have one folder level ("sub/x"). Everything in it is removed on the way out."""
    folder = Path(tempfile.mkdtemp(prefix="rwkv-convert-client-"))  # mode 0700: ours alone
    view = ClientView(folder)
    made: list[Path] = []
    try:
        for name, source in files.items():
            try:
                fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise RwkvConvertError(f"cannot read {source}: {e.strerror or e}") from None
            view.fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RwkvConvertError(f"{source} is not a regular file; give the file itself")
            link = _place(folder, name, made)
            if _PROC_FD.is_dir():
                os.symlink(_PROC_FD / str(fd), link)
            else:  # no /proc (not Linux): the resolved file, linked under our name
                os.symlink(Path(source).resolve(), link)
        for name, data in (copies or {}).items():
            _place(folder, name, made).write_bytes(data)
        yield view
    finally:
        for fd in view.fds:
            os.close(fd)
        for path in reversed(made):  # only what we made, children before their folders
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()


def _place(folder: Path, name: str, made: list[Path]) -> Path:
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"not a name inside the view: {name!r}")
    target = folder.joinpath(*parts)
    for parent in reversed(target.relative_to(folder).parents[:-1] if len(parts) > 1 else []):
        directory = folder / parent
        if not directory.exists():
            directory.mkdir()
            made.append(directory)
    made.append(target)
    return target
