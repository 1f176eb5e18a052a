"""GET / in headless Chromium (Debian's package; `make setup` installs it): the page runs an edit on a sample image
and shows the result and its timings; a screenshot of it is taken."""
from __future__ import annotations

import re
import shutil
import subprocess
from urllib.parse import urlencode

import pytest
from PIL import Image

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--virtual-time-budget=90000"]


def chromium(tmp_path, name: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=150, cwd=tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH and `make setup` could not install Debian's "
                    "chromium package (apt-get unavailable or not root)")
def test_page_runs_an_edit_in_headless_chromium(served, tmp_path):
    query = urlencode({"sample": 1, "prompt": "add a moon", "steps": 2, "auto_resize": "false", "run": 1})
    url = f"{served.url}/?{query}"
    dom = chromium(tmp_path, "dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'<img id="output"[^>]*src="data:image/png;base64,', dom.stdout), dom.stdout[-3000:]
    assert "done (batch of 1)" in dom.stdout
    assert re.search(r"<td>transformer</td><td>[\d.]+ ms</td>", dom.stdout)
    shot = tmp_path / "page.png"
    run = chromium(tmp_path, "shot", f"--screenshot={shot}", "--window-size=1000,700", url)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1000, 700)
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 50  # the page with two images, not a blank
