"""Helpers of the abuse suites: the server's memory (/proc), error-body checks, crafted images and raw uploads."""
from __future__ import annotations

import base64
import io
import re
import select
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image

KEY = "test-key-0123456789abcdef"
FAST_S = 5.0  # a refusal on a loaded 2-core machine: milliseconds; the old unbounded paths took 3 to 13 s
MEMORY_MB = 300
EDIT = {"prompt": "add a moon", "steps": "2", "auto_resize": "false", "seed": "4"}
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1])


class Memory:
    """The server's peak RSS over a block, above its RSS before (the peak is reset through clear_refs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> "Memory":
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.field = "VmHWM"
        except OSError:
            self.field = "VmRSS"
        self.before = status_kb(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.grew_mb = (status_kb(self.pid, self.field) - self.before) / 1024


def leaks(text: str, *paths: Path) -> list[str]:
    """Server paths a response body names."""
    found = [str(p) for p in paths if str(p) in text]
    return found + [word for word in ("/tmp/", "site-packages", ".py\"", "/work/", "/home/") if word in text]


def error_of(response: httpx.Response, status: int, param: str | None, code: str, *, elapsed: float | None = None,
             bound: float = FAST_S) -> dict:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert not leaks(response.text), error
    if elapsed is not None:
        assert elapsed < bound, f"took {elapsed:.2f}s"
    return error


def multipart(fields: list[tuple[bytes, bytes]], boundary: bytes = b"xyzzy") -> tuple[bytes, dict]:
    """A multipart body of raw (name, value) fields, bytes as given (no encoding)."""
    parts = [b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n" + value + b"\r\n"
             for name, value in fields]
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}
    return b"".join(parts) + b"--" + boundary + b"--\r\n", headers


def png_of_size(width: int, height: int) -> bytes:
    """A valid all-black greyscale PNG of width x height, a few hundred KB at most however large (zlib of zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def raw_upload(port: int, declared: int | None, total: int, key: str = KEY) -> tuple[int, float, int]:
    """POST an edit whose image part is `total` bytes (Content-Length `declared`, or chunked) over a raw socket,
    stopping as soon as the server answers; (status, seconds, bytes sent)."""
    boundary = b"rawupload"
    head = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--" + boundary +
            b"\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    lines = [b"POST /v1/images/edits HTTP/1.1", f"Host: 127.0.0.1:{port}".encode(),
             f"Authorization: Bearer {key}".encode(), b"Content-Type: multipart/form-data; boundary=" + boundary]
    lines.append(b"Transfer-Encoding: chunked" if declared is None else f"Content-Length: {declared}".encode())
    start, sent, answer = time.perf_counter(), 0, b""
    chunk = b"\0" * 2**16
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        first = True
        while sent < total and time.perf_counter() - start < 20:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            data = (head if first else b"") + chunk
            first = False
            if declared is None:
                data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
            try:
                sock.sendall(data)
            except OSError:  # the server answered and closed
                break
            sent += len(data)
        sock.settimeout(10)
        try:
            while b"\r\n" not in answer:
                got = sock.recv(4096)
                if not got:
                    break
                answer += got
        except OSError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, time.perf_counter() - start, sent


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def post(url: str, path: str, *, key: str | None = KEY, headers: dict | None = None,
         **kw) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}{path}", headers={**auth, **(headers or {})}, timeout=120, **kw)
    return response, time.perf_counter() - start


def edit(url: str, image: bytes, fields: dict, **kw) -> tuple[httpx.Response, float]:
    return post(url, "/v1/images/edits", data=fields, files={"image": ("in.png", image, "image/png")}, **kw)


def decode(response: httpx.Response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]


def assert_alive(url: str, image: bytes) -> None:
    """A normal edit of the 96x64 sample still answers 200."""
    response, _ = edit(url, image, EDIT)
    assert response.status_code == 200, response.text[:500]
    assert decode(response)[0].size == (96, 64)


def chromium_dom(url: str, profile: Path) -> str:
    """The DOM headless Chromium ends with on `url` (virtual time: the page's fetches finish first)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--virtual-time-budget=90000"]
    run = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True,
                         text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout
