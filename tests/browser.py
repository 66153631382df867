"""Headless Chromium for tests that check a page the way a reader's browser shows it.

``open_page`` loads a URL with the network off (every host resolves to nothing) and returns the
DOM after load, Chromium's log (console messages appear there as ``CONSOLE`` lines) and every URL
the page requested, read from Chromium's net log. scripts/setup installs Debian's ``chromium``; a
missing browser fails the test, it never skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed (scripts/setup installs Debian's chromium)")
    return path


@dataclass
class Loaded:
    dom: str
    log: str  # Chromium's stderr log
    urls: list[str]  # every URL the page requested (the page itself included)

    def console(self) -> list[str]:
        """The page's console messages and security refusals (a blocked load is logged, not thrown)."""
        return [line for line in self.log.splitlines()
                if "CONSOLE" in line or "Refused to" in line or "Uncaught" in line]


def _requested_urls(net_log: Path) -> list[str]:
    """The URLs of the requests the page made, from the net log's ``URL_REQUEST_START_JOB`` events; the
    browser's own background requests (initiator "not an origin") are left out. A ``file:`` page is read
    without the network stack, so it does not appear itself."""
    text = net_log.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short when the browser exits: close it
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return sorted({e["params"]["url"] for e in log["events"] if e["type"] == start_job and "url" in e.get("params", {})
                   and e["params"].get("initiator") != "not an origin"})


def open_page(url: str, tmp_path: Path, *extra: str) -> Loaded:
    net_log = tmp_path / "netlog.json"
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-component-update", "--disable-background-networking",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}", "--net-log-capture-mode=Default",
         "--virtual-time-budget=5000", *extra, "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return Loaded(out.stdout, out.stderr, _requested_urls(net_log))


def screenshot(url: str, path: Path, tmp_path: Path, width: int = 1000, height: int = 1400) -> None:
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-shot'}", "--host-resolver-rules=MAP * ~NOTFOUND",
         f"--window-size={width},{height}", f"--screenshot={path}", url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and path.exists(), out.stderr[-2000:]
