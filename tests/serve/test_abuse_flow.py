"""Abuse of the server's time, against one real `kontext-trt serve` process on loopback: an edit past --timeout and
an edit whose client hangs up are both stopped between steps (the next edit is answered at once, not after them),
clients that trickle their headers or body are cut off within --read-timeout, and after each the server answers a
normal edit, its memory bounded."""
from __future__ import annotations

import socket
import time

import httpx
import pytest
from conftest import server_process

TIMEOUT_S, READ_TIMEOUT_S = 5, 2
# An edit the tiny model takes about a minute over on this CPU (100 steps at 1024x1024, ~0.6 s each): long past
# --timeout, and long enough that a follow-up stuck behind it could never answer within TIMEOUT_S.
HUGE = {"prompt": "a red house", "size": "1024x1024", "steps": 100}
EDIT = {"prompt": "add a moon", "steps": "2", "auto_resize": "false"}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    # No safety checker: these timings budget the model alone (NudeNet adds ~0.2-0.4 s per call on a busy CPU).
    with server_process("--model", str(tiny_ckpt), "--dtype", "fp32", "--timeout", str(TIMEOUT_S),
                        "--read-timeout", str(READ_TIMEOUT_S), "--safety-checker", "none") as served:
        yield served


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def metric(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name))


def normal_edit(url: str, png: bytes) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.post(f"{url}/v1/images/edits", data=EDIT, files={"image": ("in.png", png, "image/png")},
                          timeout=60)
    return response, time.monotonic() - start


def test_an_edit_past_the_timeout_is_stopped(server, sample_png):
    png = sample_png.read_bytes()
    assert normal_edit(server.url, png)[0].status_code == 200
    before = rss_mib(server.proc.pid)
    start = time.monotonic()
    late = httpx.post(f"{server.url}/v1/images/generations", json=HUGE, timeout=60)
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 3
    following, seconds = normal_edit(server.url, png)  # behind an edit still running, this would wait ~a minute
    assert following.status_code == 200 and seconds < 4, (following.status_code, seconds)
    assert metric(server.url, "kontext_batches_cancelled_total") == 1
    assert rss_mib(server.proc.pid) - before < 1024  # one 1024x1024 batch's activations at most, nothing kept


def test_a_client_that_hangs_up_frees_the_model(server, sample_png):
    png = sample_png.read_bytes()
    cancelled = metric(server.url, "kontext_batches_cancelled_total")
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1.5 s and closes its connection
        httpx.post(f"{server.url}/v1/images/generations", json=HUGE, timeout=1.5)
    following, seconds = normal_edit(server.url, png)
    assert following.status_code == 200 and seconds < 4, (following.status_code, seconds)
    assert time.monotonic() - start < TIMEOUT_S + 2  # answered before the server's own timeout could have stopped it
    assert metric(server.url, "kontext_batches_cancelled_total") == cancelled + 1
    assert metric(server.url, 'kontext_requests_total{endpoint="/v1/images/generations",status="499"}') == 1


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.settimeout(0.3)
    return conn


def trickle(conn: socket.socket, data: bytes, limit_s: float) -> tuple[bytes, float]:
    """Send one byte every 0.3 s until the server answers or closes (or limit_s passes); what it sent back, when."""
    start, answer = time.monotonic(), b""
    for byte in data:
        if time.monotonic() - start > limit_s:
            break
        try:
            conn.sendall(bytes([byte]))
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        answer += chunk
        if not chunk or answer.endswith(b"}"):
            break
    return answer, time.monotonic() - start


SLOW_BODIES = {  # a valid start of each route's body, then more than a client can trickle within the read timeout
    "/v1/images/edits": (b"multipart/form-data; boundary=b",
                         b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n' + b"x" * 4000),
    "/v1/images/generations": (b"application/json", b'{"prompt": "' + b"x" * 4000 + b'"}'),
}


@pytest.mark.parametrize("route", SLOW_BODIES)
def test_a_body_trickled_past_the_read_timeout_gets_408(server, sample_png, route):
    content_type, body = SLOW_BODIES[route]
    conn = raw_connection(server.url)
    try:
        conn.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                     % (route.encode(), content_type, len(body)))
        answer, seconds = trickle(conn, body, READ_TIMEOUT_S + 10)
    finally:
        conn.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"code":"request_timeout"' in answer and b"connection: close" in answer.lower()
    assert READ_TIMEOUT_S - 0.5 < seconds < READ_TIMEOUT_S + 2
    assert normal_edit(server.url, sample_png.read_bytes())[0].status_code == 200


def test_headers_trickled_past_the_read_timeout_close_the_connection(server, sample_png):
    conn = raw_connection(server.url)
    try:
        conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\n")
        answer, seconds = trickle(conn, b"Host: 127.0.0.1\r\n" + b"X-Slow: " + b"y" * 200, READ_TIMEOUT_S + 10)
    finally:
        conn.close()
    assert answer == b"" and READ_TIMEOUT_S - 0.5 < seconds < READ_TIMEOUT_S + 2, (answer[:200], seconds)
    assert normal_edit(server.url, sample_png.read_bytes())[0].status_code == 200
