"""Outputs appear whole or not at all. Every file (or directory) of an output is written under a hidden temp
name in its target directory and renamed into place only once all of it is complete and synced; on any
failure, KeyboardInterrupt included, the temps are removed. Every writer uses this, so a failed write reads
the same whatever the format."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import RwkvConvertError

try:
    import fcntl
except ImportError:  # Windows: no flock, so concurrent runs are only as safe as each rename
    fcntl = None

TEMP_SUFFIX = ".rwkv-tmp"  # temps: .NAME.PID.TOKEN.rwkv-tmp (and that + .data for scratch data)
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP while an output was being written: raised like SIGINT's KeyboardInterrupt, so that
    the temps are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def _handling(signals: tuple, handler) -> Iterator[None]:
    """`handler` for these signals within the block, the previous handlers after it (main thread only: other
    threads cannot set handlers, and signals are delivered to the main thread anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in signals:
        with contextlib.suppress(ValueError, OSError):  # not allowed here (an embedding interpreter)
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def signals_interrupt():
    """Within the block, SIGTERM and SIGHUP raise Interrupted instead of killing the process where it stands."""
    return _handling(CLEANUP_SIGNALS, _raise_interrupted)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _delete(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def remove_stale_temps(final: Path) -> None:
    """Temps of `final` left by a run that died without cleaning up (SIGKILL, a power cut): removed once
    their process is gone. Only our own naming is touched."""
    prefix = f".{final.name}."
    with contextlib.suppress(OSError):
        for path in final.parent.iterdir():
            name = path.name
            if not name.startswith(prefix) or TEMP_SUFFIX not in name:
                continue
            pid = name[len(prefix):].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _delete(path)


def temp_path(final: Path) -> Path:
    """Hidden, in the target's directory, unique to this writer (threads of one process too), with the PID
    that lets a later run tell a dead run's leftovers."""
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def write_error(path: Path, e: OSError) -> RwkvConvertError:
    short = re.fullmatch(r"(\d+) requested and (\d+) written", str(e))  # numpy's tofile on a full disk
    if e.errno is None and short:
        return RwkvConvertError(f"cannot write {path}: only {int(short[2]):,} of {int(short[1]):,} bytes of a block"
                                " could be written (is the disk full?); free some space or choose another output")
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        why += "; free some space or choose another output"
    return RwkvConvertError(f"cannot write {path}: {why}")


_PROTECTED: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("protected", default=())
_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("output_root", default=None)
_PUBLISHED: contextvars.ContextVar[dict[Path, int] | None] = contextvars.ContextVar("published", default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[Path, int]]:
    """{path: size} of every file published within the block, as this run wrote it (another run may replace
    it a moment later: report these sizes, not a later stat)."""
    published: dict[Path, int] = {}
    token = _PUBLISHED.set(published)
    try:
        yield published
    finally:
        _PUBLISHED.reset(token)


@contextlib.contextmanager
def protecting(*inputs: Path) -> Iterator[None]:
    """Within the block, no path this tool writes may be one of these inputs (a file, or a directory and
    everything in it), whatever the path it is given (the same name, a hard link or a symlink to it), nor a
    folder that holds one."""
    token = _PROTECTED.set(_PROTECTED.get() + tuple(Path(p) for p in inputs))
    try:
        yield
    finally:
        _PROTECTED.reset(token)


@contextlib.contextmanager
def writing_under(root: Path) -> Iterator[None]:
    """Within the block, every path this tool writes must lie strictly inside `root` (release's --out)."""
    token = _ROOT.set(Path(root))
    try:
        yield
    finally:
        _ROOT.reset(token)


def _forms(path: Path) -> set[Path]:
    """The path as named (absolute, `..` folded) and with every link resolved: an input reached through a
    symlink is protected under both names."""
    forms = {Path(os.path.abspath(path))}
    with contextlib.suppress(OSError, RuntimeError):
        forms.add(path.resolve())
    return forms


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def check_output(final: Path) -> None:
    """The one guard every path this tool writes passes (AtomicOutput calls it; the CLI calls it for reports
    before any work): never an input, a link to one, or a folder holding one; never the current directory or
    a folder above it; never outside the output root when one is set (release)."""
    final = Path(final)
    targets = _forms(final)
    here = _forms(Path.cwd())
    if any(h == t or h.is_relative_to(t) for h in here for t in targets):
        raise RwkvConvertError(f"refusing to write {final}: it is the current directory or a folder above it;"
                               " name a file or a new folder for the output")
    root = _ROOT.get()
    if root is not None:
        roots = _forms(root)
        if not all(any(t != r and t.is_relative_to(r) for r in roots) for t in targets):
            raise RwkvConvertError(f"refusing to write {final}: it is not inside the output folder {root}")
    for source in _PROTECTED.get():
        sources = _forms(source)
        if _same_file(final, source) or targets & sources:
            raise RwkvConvertError(f"refusing to write {final}: it is the input {source}; a command never changes"
                                   " its inputs - choose another output")
        if any(s.is_relative_to(t) for s in sources for t in targets):
            raise RwkvConvertError(f"refusing to write {final}: it holds the input {source}; a command never"
                                   " replaces a folder its inputs are in - choose another output")
        if source.is_dir() and any(t.is_relative_to(s) for s in sources for t in targets):
            raise RwkvConvertError(f"refusing to write {final}: it is inside the input {source}; a command never"
                                   " changes its inputs - choose another output")


def check_target_directory(path: Path) -> None:
    """The one wording for an output whose directory is missing or cannot be written, said before any work."""
    directory = path.parent
    if not directory.is_dir():
        raise RwkvConvertError(f"cannot write {path}: the directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK | os.X_OK):  # also false on a read-only mount, even for root
        read_only = hasattr(os, "statvfs") and os.statvfs(directory).f_flag & os.ST_RDONLY
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise RwkvConvertError(f"cannot write {path}: the directory {directory} {why}; choose another output")


@contextlib.contextmanager
def _publishing(directories: set[Path]) -> Iterator[None]:
    """An exclusive flock on the target directories while one output's files are renamed into place: two runs
    writing the same output publish one after the other, each as a whole (the later one wins), never a mix.
    A signal that arrives meanwhile (SIGINT too) waits until the renames are done, then interrupts."""
    fds, received = [], []
    with _handling((signal.SIGINT, *CLEANUP_SIGNALS), lambda signum, frame: received.append(signum)):
        try:
            for directory in sorted(directories):
                fd = os.open(directory, os.O_RDONLY)
                fds.append(fd)
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            for fd in fds:
                os.close(fd)  # releases the lock
    if received:
        raise KeyboardInterrupt() if received[0] == signal.SIGINT else Interrupted(received[0])




def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicOutput:
    """with AtomicOutput(final, ...) as out: write each file to out.temp(final); on a clean exit they are
    synced and renamed into place in the order given (put a file the others refer to first). directory=True:
    each final is a directory (it may exist if empty) and its temp is a fresh directory."""

    def __init__(self, *finals: Path, directory: bool = False):
        self.finals = [Path(f) for f in finals]
        for final in self.finals:  # before any name is made from it ('.' has none)
            check_output(final)
        self.directory = directory
        self._temps = {final: temp_path(final) for final in self.finals}

    def temp(self, final: Path | None = None) -> Path:
        return self._temps[Path(final) if final is not None else self.finals[0]]

    def __enter__(self) -> AtomicOutput:
        for final in self.finals:
            check_target_directory(final)
            remove_stale_temps(final)
            if self.directory:
                if final.exists() and (not final.is_dir() or any(final.iterdir())):
                    raise RwkvConvertError(f"{final} exists and is not an empty directory; give a new directory")
            elif final.is_dir():
                raise RwkvConvertError(f"{final} is a directory; give the output file's name")
        self._signals = signals_interrupt()
        self._signals.__enter__()
        if self.directory:
            try:
                for tmp in self._temps.values():
                    tmp.mkdir()
            except OSError as e:
                self._remove()
                self._signals.__exit__(None, None, None)
                raise write_error(self.finals[0], e) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type, exc)
        finally:
            self._signals.__exit__(None, None, None)

    def _finish(self, exc_type, exc) -> None:
        if exc_type is not None:
            self._remove()
            if isinstance(exc, OSError):
                raise write_error(self.finals[0], exc) from None
            return
        try:
            sizes = {}
            for final, tmp in self._temps.items():
                for path in (sorted(tmp.rglob("*")) if self.directory else [tmp]):
                    if path.is_file():
                        _fsync(path)
                        sizes[final / path.relative_to(tmp) if self.directory else final] = path.stat().st_size
            with _publishing({final.parent for final in self.finals}):
                for final, tmp in self._temps.items():
                    if self.directory and final.exists():
                        final.rmdir()  # empty (checked on entry)
                    os.replace(tmp, final)
            published = _PUBLISHED.get()
            if published is not None:
                published.update(sizes)
        except BaseException as e:
            self._remove()
            if isinstance(e, OSError):
                raise write_error(self.finals[0], e) from None
            raise

    def _remove(self) -> None:
        for tmp in self._temps.values():
            _delete(tmp)
            _delete(tmp.with_name(tmp.name + ".data"))  # a writer's scratch data beside it


def write_text_atomic(path: Path, text: str) -> None:
    with AtomicOutput(Path(path)) as out:
        out.temp().write_text(text, encoding="utf-8")
