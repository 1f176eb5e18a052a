"""runtime/files.py: the one atomic write, the versioned JSON reader, stale-temp cleanup and the folder lock."""
import errno
import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from kontext_trt.core import files
from kontext_trt.core.errors import KontextError, WriteError


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    files.write_atomic(path, b"new bytes")
    files.write_atomic(tmp_path / "b.txt", "text ü")
    files.write_atomic(tmp_path / "c.bin", lambda tmp: tmp.write_bytes(b"from a library"))
    assert path.read_bytes() == b"new bytes" and (tmp_path / "b.txt").read_text("utf-8") == "text ü"
    assert (tmp_path / "c.bin").read_bytes() == b"from a library"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.bin"]


def test_disk_full_is_one_line_exit_1_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as caught:
        files.write_atomic(path, full)
    assert caught.value.exit_code == 1 and "\n" not in str(caught.value)
    assert "No space left on device (ENOSPC)" in str(caught.value) and str(path) in str(caught.value)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_temp_names_are_per_process_and_only_dead_owners_are_cleaned(tmp_path):
    a, b = files.temp_path(tmp_path / "x.plan"), files.temp_path(tmp_path / "x.plan")
    assert a != b and files.owner_pid(a) == os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = tmp_path / f".x.plan.{os.getpid()}-0a0b.tmp"
    stale_file = tmp_path / f".x.plan.{dead_pid}-0a0b.tmp"
    stale_dir = tmp_path / f".clip.{dead_pid}.tmp"  # the older .NAME.PID.tmp form
    other = tmp_path / ".hidden.tmp"  # not ours: no PID
    for p in (live, stale_file, other):
        p.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"x")
    assert sorted(p.name for p in files.remove_stale_temps(tmp_path)) == sorted([stale_file.name, stale_dir.name])
    assert live.exists() and other.exists() and not stale_dir.exists()


def test_read_json_refuses_in_one_line(tmp_path):
    path = tmp_path / "m.json"
    assert files.read_json(path) is None
    for text, words in (("[1, 2]", "holds a JSON list, not an object"), ("{oops", "is not valid JSON"),
                        (b"\xff\xfe", "is not valid JSON"), ('{"format_version": 0}', "format_version 0 is not 1")):
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(KontextError, match=words) as caught:
            files.read_json(path, version=1, fix="re-export")
        assert str(caught.value).endswith("re-export") and "\n" not in str(caught.value)
    path.unlink()
    path.mkdir()
    with pytest.raises(KontextError, match="is unreadable"):
        files.read_json(path)
    path.rmdir()
    path.write_text(json.dumps({"format_version": 1, "a": 1}))
    assert files.read_json(path, version=1) == {"format_version": 1, "a": 1}


def test_temp_dir_has_normal_permissions(tmp_path):
    folder = files.temp_dir(tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask and files.owner_pid(folder) == os.getpid()


def _add_key(path: str, key: str, delay: float) -> None:
    with files.update_json(path) as value:
        time.sleep(delay)  # hold the lock while a sibling waits for it
        value[key] = True


def test_update_json_under_the_folder_lock_loses_no_update(tmp_path):
    path = tmp_path / "manifest.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_key, args=(str(path), f"k{i}", 0.2)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert json.loads(path.read_text()) == {"k0": True, "k1": True, "k2": True}
