"""The report renders in a real browser: headless Debian Chromium driven over the DevTools pipe (stdlib only).

Checks that the page loads with no console error, no uncaught exception, no failed resource, and that every <img>
decoded (naturalWidth > 0); saves a full-page screenshot to <results-dir>/report-browser/report.png.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

import reports
from harness.records import load_many
from harness.verdict import gate
from harness.verdict.thresholds import DEFAULT_THRESHOLDS
from tests.synthetic_runs import H100_ENV, write_synthetic_fit, write_synthetic_run

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,900"]
IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({src: i.getAttribute('src'),
    complete: i.complete, width: i.naturalWidth})))"""
# the synthetic-data banner as the reader sees it: its rendered text and where it sits in the first screen
BANNER_JS = """JSON.stringify((() => { const b = document.getElementById('synthetic'); if (!b) return null;
    const r = b.getBoundingClientRect(), s = getComputedStyle(b);
    return {text: b.innerText, top: r.top, height: r.height, width: r.width, viewport: window.innerHeight,
            shown: s.display !== 'none' && s.visibility === 'visible' && parseFloat(s.opacity) > 0}; })())"""


def _above_nine(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """Chrome DevTools protocol over --remote-debugging-pipe: NUL-terminated JSON, commands on fd 3, replies on fd 4."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # move the child's ends above 9 so that wiring them to 3 and 4 cannot clobber one with the other
        to_chrome_r, from_chrome_w = _above_nine(to_chrome_r), _above_nine(from_chrome_w)
        # chromium reads commands from its fd 3 and writes replies to its fd 4; bash (dash takes one-digit fds
        # only) wires our pipe ends there. stderr goes to a file: its chatter must not fill a pipe and block it.
        profile.mkdir(parents=True, exist_ok=True)
        self._stderr = open(profile / "chromium.log", "w+b")
        wire = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen(["bash", "-c", wire, str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
                                     stderr=self._stderr)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.deadline = time.monotonic() + timeout
        self.events: list[dict] = []
        self._buffer = b""
        self._id = 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                self._stderr.seek(0)
                raise RuntimeError(f"chromium exited: {self._stderr.read().decode(errors='replace')[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._stderr.close()


def load_page(page: Path, profile: Path, screenshot: Path | None = None) -> dict:
    """Open a local page; return its images and the console errors / exceptions / failed loads seen."""
    tools = DevTools(profile)
    try:
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            tools.send(f"{domain}.enable", session)
        tools.send("Page.navigate", session, url=page.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        images = json.loads(tools.send("Runtime.evaluate", session, expression=IMAGES_JS,
                                       returnByValue=True)["result"]["value"])
        sections = tools.send("Runtime.evaluate", session, returnByValue=True,
                              expression="Array.from(document.querySelectorAll('section')).map(s => s.id)"
                              )["result"]["value"]
        banner = json.loads(tools.send("Runtime.evaluate", session, expression=BANNER_JS,
                                       returnByValue=True)["result"]["value"])
        if screenshot:
            size = tools.send("Page.getLayoutMetrics", session)["cssContentSize"]
            shot = tools.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for e in tools.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return {"images": images, "errors": errors, "sections": sections, "banner": banner}
    finally:
        tools.close()


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: install it with `apt-get install -y chromium` "
                    "(the bootstrap does this); the report's browser test needs it", pytrace=False)
    return CHROMIUM


def test_report_renders_in_chromium(chromium, tmp_path, request):
    cpu = write_synthetic_run(tmp_path / "cpu", seed=1, failed=("tiny-sd3/onnxruntime/fp32/b1/64x64/s4",),
                           prompt="a red fox <script>console.error('injected')</script>")
    gpu = write_synthetic_run(tmp_path / "gpu", env=H100_ENV, seed=2, run_id="gpu-run")
    fit_records, fit_document = write_synthetic_fit(tmp_path / "fit")
    records = load_many([cpu, gpu, tmp_path / "fit" / "records.jsonl"])
    result = gate.compare(load_many([cpu]), records, DEFAULT_THRESHOLDS)
    page = reports.build_report(records, tmp_path / "report", gate_result=result, title="browser <b>test</b>",
                                fit=fit_document)

    results_dir = Path(request.config.getoption("--results-dir", default="results") or "results")
    shot = results_dir / "report-browser" / "report.png"
    seen = load_page(page, tmp_path / "profile", screenshot=shot)

    assert seen["errors"] == []
    assert len(seen["images"]) >= 20, seen["images"]
    broken = [i["src"] for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == []
    assert {"summary", "gate", "latency", "cold", "memory", "compat", "correctness", "images",
            "serving", "fit"} <= set(seen["sections"])
    assert shot.stat().st_size > 10_000
    # the fixture's records are made up: the banner says so, visible at the top of the first screen
    banner = seen["banner"]
    assert banner and banner["shown"] and banner["height"] > 20 and banner["width"] > 300, banner
    assert 0 <= banner["top"] and banner["top"] + banner["height"] <= banner["viewport"], banner
    text = " ".join(banner["text"].split())
    import re
    shown = re.search(r"(\d+) of the (\d+) records in this report are made up", text)
    assert shown and shown.group(1) == shown.group(2) and int(shown.group(1)) > 20, text


def test_the_check_catches_broken_images_and_console_errors(chromium, tmp_path):
    """The browser check itself can fail: a missing image and a console error are reported."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png">'
                    '<script>console.error("boom")</script></body></html>')
    seen = load_page(page, tmp_path / "profile")
    assert [i["width"] for i in seen["images"]] == [0]
    assert any("boom" in e for e in seen["errors"])
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in seen["errors"])
    assert seen["banner"] is None
