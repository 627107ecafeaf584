"""Crash-safe, concurrency-safe file I/O shared by every resumable job (protocols: docs/storage.md).

* :func:`atomic_write` / :func:`atomic_write_with`: a file appears whole or not at all (unique temporary
  name in the same directory, ``fsync``, ``os.replace``, ``fsync`` of the directory); :func:`write_json`
  writes a JSON document that way, :func:`read_json` reads one back.
* :func:`append_line`: one ``O_APPEND`` write of a whole record, then ``fsync``.
* :func:`make_temp_dir` / :func:`replace_dir`: build a directory aside and swap it into place.
* :func:`clean_leftovers`: remove what a killed run left (temporary files and directories); call it
  only while holding the output's lock.
* :func:`output_lock`: an advisory per-output lock (``flock``) that records the holder's pid and host.
  A second run fails fast (or waits ``wait`` seconds) with a message naming the holder; a lock left by
  a dead process is released by the kernel and taken over.
* :class:`DamagedFileError`: a file that cannot be read says "damaged", names itself and the recovery.
* :func:`crash_point`: called after every write, ``fsync``, rename and removal above. With
  ``QSCOPE_CRASH_AT=<n>`` in the environment (or :func:`arm_crash`) the process SIGKILLs itself right
  after the n-th one, which is how the tests kill a job at every step; unset, it costs one test.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

TMP_SUFFIX = ".qscope-tmp"
_log = logging.getLogger(__name__)

# ---- crash points (the kill-at-every-step harness) -----------------------------------------------
_crash_at = int(os.environ.get("QSCOPE_CRASH_AT") or 0)
_steps = 0


def arm_crash(n: int) -> None:
    """SIGKILL this process right after its ``n``-th crash point from now (``0`` disarms; a very large
    ``n`` only counts, see :func:`steps_taken`)."""
    global _crash_at, _steps
    _crash_at, _steps = int(n), 0


def steps_taken() -> int:
    """Crash points passed since :func:`arm_crash` (counted only while armed)."""
    return _steps


def crash_point(what: str = "") -> None:
    """Mark a durable step (a write, fsync, rename or removal has just completed)."""
    global _steps
    if _crash_at:
        _steps += 1
        if _steps == _crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


# ---- errors ----------------------------------------------------------------------------------------
class DamagedFileError(ValueError):
    """A job's file exists but cannot be read; the message names it and says how to recover."""

    def __init__(self, path: str | os.PathLike, why: str, recovery: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path} is damaged ({why}); {recovery}")


class OutputLocked(ValueError):
    """Another live process holds the lock of the output this run would write."""


def read_json(path: str | os.PathLike, recovery: str) -> dict:
    """A JSON object from ``path``, or :class:`DamagedFileError` (truncated, not JSON, not an object)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(path, f"not valid JSON: {err}", recovery) from None
    if not isinstance(data, dict):
        raise DamagedFileError(path, f"expected a JSON object, found {type(data).__name__}", recovery)
    return data


# ---- atomic files --------------------------------------------------------------------------------
def jsonl_values(path: str | os.PathLike, text: str | None = None, *,
                 error: type[Exception] = ValueError) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` of each non-blank line of a JSONL file (``text``: its contents, if already read);
    a line that is not JSON raises ``error`` naming the file and the line."""
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
        yield number, value


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or removal inside ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    crash_point("fsync-dir")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    crash_point("fsync")


def _install(tmp: Path, path: Path) -> None:
    crash_point("write")
    _fsync_file(tmp)
    os.replace(tmp, path)
    crash_point("rename")
    fsync_dir(path.parent)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Let ``writer(p)`` write ``p``, a file of the same name as ``path`` in a fresh temporary directory
    next to it (writers such as ``torch.save`` embed the file name in the bytes), then fsync it, rename it
    into place and remove the directory."""
    path = Path(path)
    folder = make_temp_dir(path.parent, path.name)
    try:
        tmp = folder / path.name
        writer(tmp)
        _install(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def sweep_dead_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories of ``path`` that processes no longer running left
    (their names carry the writer's pid); those of live processes are kept."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(TMP_SUFFIX)):
            continue
        pid = entry.name[len(prefix):].split(".")[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed


def atomic_write(path: str | os.PathLike, data: bytes | str, *, sweep: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically: readers (and a resumed run) never see a partial file.

    The temporary name is unique per process and call, so two writers never collide on it. With
    ``sweep`` (the default) temporary files of ``path`` left by killed writers are removed first, so a
    single-file output rewritten after a kill leaves nothing behind; jobs writing many files pass
    ``sweep=False`` and clean up once, under their lock (:func:`clean_leftovers`).
    """
    path = Path(path)
    if sweep:
        sweep_dead_temps(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        _install(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_json(path: str | os.PathLike, obj, *, indent: int = 1, sweep: bool = True, **dumps) -> Path:
    """``obj`` as a JSON document (``json.dumps(obj, indent=indent, **dumps)`` and a newline), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, **dumps) + "\n", sweep=sweep)


def npz_bytes(arrays: Mapping) -> bytes:
    """A deterministic ``.npz`` (``np.load`` reads it): sorted entries, fixed timestamps, deflate."""
    import io
    import zipfile

    import numpy as np

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(arrays):
            payload = io.BytesIO()
            np.lib.format.write_array(payload, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, payload.getvalue())
    return buffer.getvalue()


def load_npz(path: Path, recovery: str) -> dict:
    """The arrays of an ``.npz`` (never unpickling); a missing or unreadable file is a :class:`DamagedFileError`."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DamagedFileError(path, "missing", recovery) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedFileError(path, f"not a readable .npz: {err}", recovery) from None


def append_line(path: str | os.PathLike, data: bytes) -> None:
    """Append one whole record (ending in a newline) with a single ``O_APPEND`` write, then ``fsync``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        crash_point("write")
        os.fsync(fd)
        crash_point("fsync")
    finally:
        os.close(fd)


def truncate_to_last_line(path: str | os.PathLike) -> bool:
    """Cut an unterminated last line (a record a crash interrupted); True when something was cut."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end == len(data):
        return False
    with open(path, "r+b") as handle:
        handle.truncate(end)
        handle.flush()
        os.fsync(handle.fileno())
    crash_point("truncate")
    return True


# ---- directories -------------------------------------------------------------------------------
def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh directory ``parent/.{name}.<pid>.<random>.qscope-tmp`` to build ``parent/name`` in."""
    path = _temp_name(Path(parent) / name)
    path.mkdir()
    return path


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory so that a crash midway leaves only a leftover :func:`clean_leftovers` removes."""
    path = Path(path)
    if not path.exists():
        return
    trash = _temp_name(path)
    os.replace(path, trash)
    crash_point("rename")
    shutil.rmtree(trash)
    crash_point("remove")


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Swap the finished directory ``tmp`` into ``final`` (an old ``final`` is moved aside, then removed)."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists():
        trash = _temp_name(final)
        os.replace(final, trash)
        crash_point("rename")
        os.replace(tmp, final)
        crash_point("rename")
        shutil.rmtree(trash)
        crash_point("remove")
    else:
        os.replace(tmp, final)
        crash_point("rename")
    fsync_dir(final.parent)


def clean_leftovers(directory: str | os.PathLike, prefix: str | None = "", extra: re.Pattern | None = None) -> list[Path]:
    """Remove temporary files and directories a killed run left in ``directory`` (names starting
    with ``.{prefix}`` and ending in ``.qscope-tmp``, unless ``prefix`` is None, plus names matching
    ``extra``); returns them. Call only while holding the lock of the output that owns ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        ours = prefix is not None and name.startswith(f".{prefix}") and name.endswith(TMP_SUFFIX)
        if not ours and not (extra is not None and extra.match(name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    if removed:
        _log.info("removed leftovers of an interrupted run: %s", ", ".join(str(p) for p in removed))
        fsync_dir(directory)
    return removed


# ---- per-output lock ---------------------------------------------------------------------------
def lock_path(output: str | os.PathLike) -> Path:
    """Where the lock of ``output`` (a file or directory) lives: ``.{name}.lock`` next to it."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


_held: dict[str, tuple[int, int, int]] = {}  # lock path -> (owner pid, fd, depth): re-entrant per process


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, *, wait: float = 0.0, what: str = "output") -> Iterator[dict]:
    """Hold the advisory lock of ``output`` for the duration of the block.

    Fails with :class:`OutputLocked` (naming the holder's pid and host) when another live process holds
    it after ``wait`` seconds. The kernel drops an ``flock`` when its process dies, so a lock file left by
    a killed run is simply taken over (the previous holder is logged). The lock file is removed on exit,
    so a finished output's directory holds nothing but the output. Re-entrant within one process.
    Yields the previous holder's record when a stale lock was taken over, else ``{}``.
    """
    path = lock_path(output)
    key = os.path.realpath(path)
    held = _held.get(key)
    if held is not None and held[0] == os.getpid():
        _held[key] = (held[0], held[1], held[2] + 1)
        try:
            yield {}
        finally:
            pid, fd, depth = _held[key]
            _held[key] = (pid, fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise OutputLocked(
                f"{output} is in use by another run ({_describe(holder)}; lock {path}): wait for it to finish "
                f"or stop it; two runs must not write the same {what}"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file after we opened it: start over
            os.close(fd)
            continue
        break
    previous = _read_holder(fd)
    if previous:
        alive = previous.get("host") == socket.gethostname() and _pid_alive(int(previous.get("pid", 0) or 0))
        _log.warning("took over the lock of %s left by %s%s", output, _describe(previous),
                     "" if not alive else " (its lock was released)")
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode("utf-8"))
    _held[key] = (os.getpid(), fd, 1)
    try:
        yield previous
    finally:
        _held.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
