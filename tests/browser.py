"""A small headless-Chromium driver for tests: Debian's ``chromium`` package, driven over the
Chrome DevTools Protocol on a WebSocket with aiohttp (no Selenium, no Playwright).

    async with Browser.launch(tmp_path) as b:
        page = await b.new_page()
        await page.goto(url)
        await page.wait_for("document.body.dataset.state === 'ready'")
        value = await page.evaluate("document.title")
        png = await page.screenshot()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.tasks import cancel_and_wait, spawn

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(RuntimeError):
    pass


class Page:
    """One tab, attached with a flat CDP session."""

    def __init__(self, browser: Browser, session_id: str, target_id: str) -> None:
        self.b = browser
        self.session_id = session_id
        self.target_id = target_id
        self.console: list[str] = []
        self.exceptions: list[str] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.b.send(method, params, self.session_id)

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                         for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.exceptions.append(str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            if e.get("level") in ("error", "warning"):
                self.console.append(f"[{e.get('source')}] {e.get('text')}")

    async def goto(self, url: str) -> None:
        loaded = self.b.expect_event("Page.loadEventFired", self.session_id)
        res = await self.send("Page.navigate", {"url": url})
        if res.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {res['errorText']}")
        if "loaderId" not in res:           # same-document (fragment) navigation: no load
            loaded.cancel()
            return
        await asyncio.wait_for(loaded, 10)

    async def evaluate(self, expression: str) -> Any:
        """Evaluate in the page (promises awaited) and return the JSON value."""
        res = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True})
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CdpError(str(d.get("exception", {}).get("description") or d.get("text")))
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {expression!r}; console: {self.console}"
                                   f"; exceptions: {self.exceptions}")
            await asyncio.sleep(0.05)

    async def screenshot(self, width: int = 1280) -> bytes:
        """A PNG of the whole page at ``width`` CSS pixels."""
        height = int(await self.evaluate("document.documentElement.scrollHeight"))
        await self.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1,
                         "mobile": False})
        res = await self.send("Page.captureScreenshot", {"format": "png",
                                                         "captureBeyondViewport": True})
        return base64.b64decode(res["data"])


class Browser:
    def __init__(self, proc: asyncio.subprocess.Process, session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse) -> None:
        self.proc = proc
        self.http = session
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = []
        self.pages: dict[str, Page] = {}
        self._listeners: dict[str, list[Callable[[dict[str, Any]], object]]] = {}
        self._reader = spawn("cdp-reader", self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, tmp: Path, binary: str | None = None) -> AsyncIterator[Browser]:
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("no chromium binary")
        profile = tmp / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        log = (tmp / "chromium.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        session = aiohttp.ClientSession()
        browser: Browser | None = None
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 20
            while True:
                text = port_file.read_text() if port_file.exists() else ""
                if text.count("\n") >= 1 and text.split("\n")[1].strip():
                    break
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise CdpError(f"chromium did not start (rc={proc.returncode}); see "
                                   f"{tmp / 'chromium.log'}")
                await asyncio.sleep(0.05)
            port, path = text.split("\n")[:2]
            ws = await session.ws_connect(f"ws://127.0.0.1:{port.strip()}{path.strip()}",
                                          max_msg_size=0)
            browser = cls(proc, session, ws)
            yield browser
        finally:
            if browser is not None:
                await browser.close()
            await session.close()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            log.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        await self.ws.close()
        await cancel_and_wait(self._reader)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CdpError(f"{data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
                continue
            method, params, sid = data.get("method", ""), data.get("params", {}), \
                data.get("sessionId")
            for fn in self._listeners.get(method, ()):
                fn(params)
            page = self.pages.get(sid or "")
            if page is not None:
                page._event(method, params)
            for w in list(self._waiters):
                if w[0] == method and (w[1] is None or w[1] == sid):
                    self._waiters.remove(w)
                    if not w[2].done():
                        w[2].set_result(params)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CdpError("the browser connection closed"))

    def on_event(self, method: str, fn: Callable[[dict[str, Any]], object]) -> None:
        """Call ``fn(params)`` for every ``method`` event (any session)."""
        self._listeners.setdefault(method, []).append(fn)

    def expect_event(self, method: str, session_id: str | None = None
                     ) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, session_id, fut))
        return fut

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session_id: str | None = None) -> dict[str, Any]:
        i = next(self._ids)
        msg: dict[str, Any] = {"id": i, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self.ws.send_str(orjson.dumps(msg).decode())
        return await asyncio.wait_for(fut, 15)

    async def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        tid = target["targetId"]
        attached = await self.send("Target.attachToTarget", {"targetId": tid, "flatten": True})
        page = Page(self, attached["sessionId"], tid)
        self.pages[page.session_id] = page
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1,
                         "mobile": False})
        return page

    async def allow_downloads(self, directory: Path) -> None:
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        await self.send("Browser.setDownloadBehavior",
                        {"behavior": "allow", "downloadPath": str(directory),
                         "eventsEnabled": True})
