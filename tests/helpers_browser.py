"""A tiny DevTools-protocol client for headless Debian ``chromium``: load a page at a given viewport, run JS, screenshot.

Headless chromium cannot make a window narrower than 500 px, so phone width is
set with ``Emulation.setDeviceMetricsOverride`` (what DevTools' device mode
does). The websocket client is aiohttp's (already installed with Ray and s3fs).

Run by hand to make the README's screenshots::

    python tests/helpers_browser.py REPORT.html docs/img/report   # -> report_phone.png, report_desktop.png
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
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PHONE, DESKTOP = (390, 844, 3.0, True), (1440, 900, 1.0, False)

#: Evaluated after load: did every image decode, is the page wider than the viewport.
CHECK_JS = """JSON.stringify({
  n_images: document.images.length,
  broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
  scroll_width: document.documentElement.scrollWidth, inner_width: window.innerWidth})"""


async def _session(url: str, viewport, expression: str | None, screenshot: bool, full_page: bool):
    import aiohttp

    # Chromium's helper processes may still be writing the profile while it is removed: never fail on that.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                 "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                                 f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            port = None
            for line in proc.stderr:
                found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
                if found:
                    port = int(found.group(1))
                    break
            if port is None:
                raise RuntimeError("chromium exited before opening its DevTools port")
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = await resp.json(content_type=None)
                ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                    ids = iter(range(1, 10_000))

                    async def call(method: str, **params):
                        msg_id = next(ids)
                        await ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
                        async for msg in ws:
                            data = json.loads(msg.data)
                            if data.get("id") == msg_id:
                                if "error" in data:
                                    raise RuntimeError(f"{method}: {data['error']}")
                                return data["result"]
                        raise RuntimeError("chromium closed the DevTools connection")

                    width, height, scale, mobile = viewport
                    await call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                               deviceScaleFactor=scale, mobile=mobile)
                    await call("Page.enable")
                    await call("Page.navigate", url=url)
                    # Data-URI images decode before load fires; poll until the document says so.
                    for _ in range(200):
                        state = await call("Runtime.evaluate", expression="document.readyState", returnByValue=True)
                        if state["result"]["value"] == "complete":
                            break
                        await asyncio.sleep(0.05)
                    result = None
                    if expression:
                        value = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                        result = json.loads(value["result"]["value"])
                    png = None
                    if screenshot:
                        params = {"format": "png"}
                        if full_page:
                            metrics = await call("Page.getLayoutMetrics")
                            size = metrics["cssContentSize"]
                            params.update(captureBeyondViewport=True, clip={
                                "x": 0, "y": 0, "width": width, "height": min(size["height"], 4 * height),
                                "scale": 1})
                        png = base64.b64decode((await call("Page.captureScreenshot", **params))["data"])
                    return result, png
        finally:
            # The whole process group: the renderer and GPU helpers too, not only the browser process.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def check_page(path: Path, viewport) -> dict:
    """Load a local HTML file at ``viewport`` (width, height, scale, mobile) and run :data:`CHECK_JS`."""
    return asyncio.run(_session(path.resolve().as_uri(), viewport, CHECK_JS, False, False))[0]


def screenshot(path: Path, viewport, full_page: bool = True) -> bytes:
    """PNG of a local HTML file at ``viewport`` (full page up to four screens tall)."""
    return asyncio.run(_session(path.resolve().as_uri(), viewport, None, True, full_page))[1]


if __name__ == "__main__":
    report, prefix = Path(sys.argv[1]), sys.argv[2]
    for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        Path(f"{prefix}_{name}.png").write_bytes(screenshot(report, viewport))
        print(f"{prefix}_{name}.png", check_page(report, viewport))
