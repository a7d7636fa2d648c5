"""A tiny DevTools-protocol client for headless Debian ``chromium``: load a page, run JS, click, type, download, screenshot.

Headless chromium cannot make a window narrower than 500 px, so phone width is
set with ``Emulation.setDeviceMetricsOverride`` (what DevTools' device mode
does). The websocket client is aiohttp's (already installed with Ray and s3fs).
Clicks and keys are real input events (``Input.dispatchMouseEvent`` /
``Input.dispatchKeyEvent``), as a person's would be: they reach the page's own
listeners through the browser's hit testing and focus.

Run by hand to make the documentation's screenshots::

    python tests/helpers_browser.py REPORT.html docs/img/report   # -> report_phone.png, report_desktop.png
    python tests/helpers_browser.py --review REVIEW.html docs/img/review_page.png [SAMPLE]
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PHONE, DESKTOP = (390, 844, 3.0, True), (1440, 900, 1.0, False)

#: Evaluated after load: did every image decode, is the page wider than the viewport.
CHECK_JS = """JSON.stringify({
  n_images: document.images.length,
  broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
  scroll_width: document.documentElement.scrollWidth, inner_width: window.innerWidth})"""

#: ``Input.dispatchKeyEvent`` fields of the named keys the tests press (others are single characters).
_KEYS = {"Enter": ("Enter", 13, "\r"), "Backspace": ("Backspace", 8, None), "Escape": ("Escape", 27, None),
         "ArrowRight": ("ArrowRight", 39, None), "ArrowLeft": ("ArrowLeft", 37, None),
         "ArrowDown": ("ArrowDown", 40, None), "ArrowUp": ("ArrowUp", 38, None), " ": ("Space", 32, " ")}


class Browser:
    """One headless chromium with one page, driven step by step from synchronous test code.

    Use as a context manager; the browser's whole process group is killed on exit.
    """

    def __init__(self, viewport=DESKTOP, downloads: Path | None = None):
        self.viewport = viewport
        self.downloads = downloads
        self._loop = asyncio.new_event_loop()
        self._profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self._proc = None
        self._http = self._ws = None
        self._ids = iter(range(1, 1_000_000))

    def __enter__(self) -> "Browser":
        try:
            self._run(self._start())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    async def _start(self) -> None:
        import aiohttp

        self._proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                       "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                                       f"--user-data-dir={self._profile.name}", "about:blank"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True)
        port = None
        for line in self._proc.stderr:
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                port = int(found.group(1))
                break
        if port is None:
            raise RuntimeError("chromium exited before opening its DevTools port")
        # Keep reading its log, or chromium blocks once the pipe is full.
        threading.Thread(target=lambda: [None for _ in self._proc.stderr], daemon=True).start()
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self._ws = await self._http.ws_connect(ws_url, max_msg_size=0)
        width, height, scale, mobile = self.viewport
        await self._call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                         deviceScaleFactor=scale, mobile=mobile)
        await self._call("Page.enable")
        if self.downloads is not None:
            await self._call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(self.downloads))

    async def _call(self, method: str, **params):
        msg_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        async for msg in self._ws:
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
        raise RuntimeError("chromium closed the DevTools connection")

    def call(self, method: str, **params):
        """Send one DevTools command; its result."""
        return self._run(self._call(method, **params))

    def open(self, path: Path) -> None:
        """Load a local HTML file and wait until the document is complete."""
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        # Data-URI images decode before load fires; poll until the document says so.
        for _ in range(400):
            if self.eval("document.readyState") == "complete":
                return
            time.sleep(0.05)
        raise RuntimeError(f"{path}: the page did not finish loading")

    def eval(self, expression: str):
        """The value of a JS expression (awaited when it is a promise); a page exception raises."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A left click in the middle of the first element matching ``selector`` (scrolled into view)."""
        box = self.eval(f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
            if (!el) return null; el.scrollIntoView({{block: "center"}}); const r = el.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        if box is None:
            raise AssertionError(f"no element matches {selector!r}")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=0 if kind == "mouseMoved" else 1)

    def key(self, key: str) -> None:
        """Press and release one key: a character (``"3"``, ``"u"``) or a name in :data:`_KEYS`."""
        code, vk, text = _KEYS.get(key) or ((f"Digit{key}" if key.isdigit() else f"Key{key.upper()}"),
                                            ord(key.upper()), key)
        down = {"type": "keyDown" if text else "rawKeyDown", "key": key if key != " " else " ", "code": code,
                "windowsVirtualKeyCode": vk}
        if text:
            down["text"] = text
        self.call("Input.dispatchKeyEvent", **down)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)

    def type(self, text: str) -> None:
        """Type text into the focused element (as an input method would)."""
        self.call("Input.insertText", text=text)

    def wait_for_download(self, name: str, timeout: float = 20.0) -> Path:
        """The path of a finished download named ``name`` in :attr:`downloads`."""
        target = Path(self.downloads) / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if target.exists() and not list(Path(self.downloads).glob("*.crdownload")):
                return target
            time.sleep(0.1)
        raise AssertionError(f"no download {name} in {self.downloads}: {os.listdir(self.downloads)}")

    def screenshot(self, full_page: bool = True) -> bytes:
        """PNG of the page (full page up to four screens tall)."""
        width, height = self.viewport[:2]
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": width, "height": min(size["height"], 4 * height), "scale": 1})
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])

    def close(self) -> None:
        """End the session and kill the browser's process group (renderer and GPU helpers too)."""
        try:
            if self._ws is not None:
                self._run(self._ws.close())
            if self._http is not None:
                self._run(self._http.close())
        finally:
            self._ws = self._http = None
            if self._proc is not None:
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._proc.wait()
                self._proc = None
            # Chromium's helper processes may still be writing the profile while it is removed: never fail on that.
            self._profile.cleanup()
            if not self._loop.is_closed():
                self._loop.close()


def check_page(path: Path, viewport) -> dict:
    """Load a local HTML file at ``viewport`` (width, height, scale, mobile) and run :data:`CHECK_JS`."""
    with Browser(viewport) as browser:
        browser.open(path)
        return json.loads(browser.eval(CHECK_JS))


def screenshot(path: Path, viewport, full_page: bool = True) -> bytes:
    """PNG of a local HTML file at ``viewport`` (full page up to four screens tall)."""
    with Browser(viewport) as browser:
        browser.open(path)
        return browser.screenshot(full_page)


def review_screenshot(page: Path, png: Path, sample: str | None = None) -> None:
    """The reviewer's guide's picture: a review page mid-review (a name typed, two cells reclassified, one
    confirmed, the next one selected), at 1,280 x 900."""
    with Browser((1280, 900, 1.0, False)) as browser:
        browser.open(page)
        if sample:
            browser.click(f"#samples button[data-sample={json.dumps(sample)}]")
        browser.click("#reviewer")
        browser.type("A. Reviewer")
        order = browser.eval("[...document.querySelectorAll('#sample .cell')].map(e => e.dataset.uri)")
        predicted = browser.eval("Object.fromEntries(bloodrayReview.data.samples.flatMap(s => s.cells)"
                                 ".map(c => [c.uri, c.cls]))")
        keys = browser.eval("bloodrayReview.data.review_classes")
        browser.click(f".cell[data-uri={json.dumps(order[0])}] .name")
        for uri in order[:2]:  # the two least confident cells: given the neighbouring class
            other = keys[(keys.index(predicted[uri]) + 1) % 8]
            browser.key(str(keys.index(other) + 1))
        browser.key("Enter")
        browser.eval("window.scrollTo(0, 0)")
        png.write_bytes(browser.screenshot(full_page=False))


if __name__ == "__main__":
    if sys.argv[1] == "--review":
        review_screenshot(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
        sys.exit(0)
    report, prefix = Path(sys.argv[1]), sys.argv[2]
    for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        Path(f"{prefix}_{name}.png").write_bytes(screenshot(report, viewport))
        print(f"{prefix}_{name}.png", check_page(report, viewport))
