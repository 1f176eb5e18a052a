"""Files written safely: one atomic write, JSON with a format version, a lock per folder, temp names with an owner.

Every temp file or folder is named `.NAME.PID-RANDOM.tmp` beside its final path: a sibling process never picks the same
name, and `remove_stale_temps` deletes only those whose owner process is gone (a killed run's leftovers).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from kontext_trt.core.errors import KontextError, WriteError

LOCK_NAME = ".kontext-trt.lock"
LOCK_TIMEOUT_S = 600.0
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:-[0-9a-f]+)?\.tmp$")  # older versions wrote .NAME.PID.tmp


def temp_path(path: str | Path) -> Path:
    """A fresh hidden `.NAME.PID-RANDOM.tmp` path beside `path`, owned by this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def owner_pid(tmp: Path) -> int | None:
    """The PID in a temp name made by temp_path, None for any other name."""
    match = _TEMP.match(Path(tmp).name)
    return int(match["pid"]) if match else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the temp files and folders in `folder` (for final name `name`, or any) whose owner process is gone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".{name}.*.tmp" if name else ".*.tmp"):
        pid = owner_pid(tmp)
        if pid is None or pid_alive(pid) or (name and _TEMP.match(tmp.name)["name"] != name):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or, best effort, a folder entry) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def sha256_file(path: str | Path, digest=None) -> str:
    """The sha256 of a file's content, read in 16 MiB chunks (pass `digest` to hash several files into one)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_error(path: Path, error: OSError) -> WriteError:
    """One line for a write that failed on the file system (disk full, read-only, permissions)."""
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno or 0)
    hint = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "check the folder"
    return WriteError(f"writing {path} failed: {reason}{f' ({code})' if code else ''}; nothing was written there: "
                      f"{hint} or choose another output")


def write_atomic(path: str | Path, data: bytes | memoryview | str | Callable[[Path], object]) -> Path:
    """Write `data` (bytes, text, or write(tmp_path) for libraries that write files) to a temp file beside path, fsync,
    then rename: readers see the old file or the whole new one, and a failure leaves neither a partial file nor the
    temp. A file-system failure (disk full, read-only) is a WriteError (one line, exit 1)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(tmp)
            _fsync(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)
    return path


def write_json(path: str | Path, value: object, indent: int = 1, sort_keys: bool = False) -> Path:
    """Write `value` as JSON (with a trailing newline) atomically."""
    return write_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path, version: int | None = None, fix: str = "delete it and run the command again",
              key: str = "format_version") -> dict | None:
    """A JSON object from `path`, None if there is no such file. Unreadable, not JSON, not an object, or (with
    `version`) another `key` value: a KontextError naming the file, what is wrong and `fix`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise KontextError(f"{path} is unreadable ({error.strerror or error}); {fix}") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KontextError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise KontextError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    if version is not None and value.get(key) != version:
        raise KontextError(f"{path}: {key} {value.get(key)!r} is not {version}; {fix}")
    return value


@contextmanager
def folder_lock(folder: str | Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a `.kontext-trt.lock` file in it) for a manifest read-modify-write."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise KontextError(f"{folder} stayed locked by another kontext-trt process for {timeout:.0f}s; wait for it "
                           f"or, if none runs, delete {folder / LOCK_NAME}") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def update_json(path: str | Path, version: int | None = None, fix: str = "delete it and run the command again",
                default: Callable[[], dict] = dict) -> Iterator[dict]:
    """Read-modify-write one JSON file under its folder's lock: yields the current object (or default()), written
    back atomically when the block ends without an error."""
    path = Path(path)
    with folder_lock(path.parent):
        value = read_json(path, version, fix)
        value = default() if value is None else value
        yield value
        write_json(path, value)


def temp_dir(path: str | Path) -> Path:
    """A fresh temp folder beside `path` with normal permissions (mkdtemp's are 0700), owned by this process."""
    tmp = temp_path(path)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished folder `new` to `final`, replacing (then deleting) any previous one."""
    if not final.exists():
        os.rename(new, final)
        return
    old = temp_path(final)
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)
