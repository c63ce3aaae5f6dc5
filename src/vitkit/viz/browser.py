"""Check a report in a real headless Chromium, over the DevTools protocol on a pipe.

Used by the tests (tests/test_report_browser.py, tests/test_explore_browser.py) and to make the
docs screenshots. :class:`Page` drives one page (evaluate JS, click, keys, read the fragment,
screenshots); :func:`check_page` is the one-shot check of a static report. Chromium is
started with ``--remote-debugging-pipe`` (protocol messages on fds 3/4, NUL-terminated JSON), so
no port, websocket library or network is needed. We navigate to the file, wait for ``load``, ask
the page (its own script) whether every ``<img>`` decoded, collect console errors / uncaught
exceptions / failed loads, and take a full-page screenshot.

``--dump-dom`` with ``--virtual-time-budget`` was tried first and dropped: image decoding happens
off the main thread in real time, so whether ``img.decode()`` had resolved when the DOM was dumped
was a race.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


@dataclass
class PageCheck:
    images: int = 0  # <img> elements on the page
    decoded: int = 0  # of those, how many decoded with a non-zero size
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    screenshot: bytes = b""  # PNG of the whole page
    page_attrs: dict = field(default_factory=dict)  # the report's own data-* results on <body>


class _Pipe:
    def __init__(self, proc, wfd: int, rfd: int, timeout: float):
        self.proc, self.w, self.r, self.timeout = proc, wfd, rfd, timeout
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            import select

            ready, _, _ = select.select([self.r], [], [], 0.5)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == mid:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str) -> dict:
        for i, m in enumerate(self.events):
            if m.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)


_CHECK_JS = """
(async () => {
  const imgs = Array.from(document.images);
  const ok = await Promise.all(imgs.map(img => img.decode().then(() => img.naturalWidth > 0, () => false)));
  const attrs = {};
  for (const a of document.body.attributes) attrs[a.name] = a.value;
  return {images: imgs.length, decoded: ok.filter(Boolean).length, attrs: attrs};
})()
"""


def _collect_errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and failed loads among DevTools events."""
    errors = []
    for m in events:
        meth, p = m.get("method"), m.get("params", {})
        if meth == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif meth == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                       for a in p.get("args", [])))
        elif meth == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
        elif meth == "Network.loadingFailed":
            errors.append(f"load failed: {p.get('errorText')}")
    return errors


def _as_url(path: str | Path) -> str:
    """A file path -> its file:// URI; an http(s) URL (a served page, vitkit explore) as it is."""
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        return path
    return Path(path).resolve().as_uri()


class Page:
    """One page in a headless Chromium, driven over the DevTools pipe; a context manager.

    ``Page(path, fragment="layer=2")`` opens ``file://path#fragment`` (or an ``http://`` URL given
    as ``path``) and waits for ``load``;
    then :meth:`evaluate` (JS expression -> its JSON value, promises awaited), :meth:`click` /
    :meth:`move` (real mouse events at page coordinates), :meth:`wait_for` (poll a JS condition),
    :meth:`screenshot`, :attr:`fragment` (``location.hash`` without ``#``), :meth:`navigate`
    (another fragment in a fresh load), and :meth:`errors` (console errors, exceptions, failed
    loads seen so far)."""

    def __init__(self, path: str | Path, fragment: str = "", width: int = 1200, height: int = 900,
                 timeout: float = 60.0, chromium: str | None = None) -> None:
        exe = chromium or find_chromium()
        if not exe:
            raise FileNotFoundError("chromium not found; install it (Debian: apt-get install chromium)")
        self.url = _as_url(path)
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="vitkit-chromium-")
        to_chrome_r, self._to_w = os.pipe()
        self._from_r, from_chrome_w = os.pipe()

        def child_fds():  # the protocol expects its input on fd 3 and its output on fd 4
            import fcntl

            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # move out of the way of 3/4 first
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)  # dup2'd descriptors are inheritable; everything else Python opened is not
            os.dup2(b, 4)
            os.close(a)
            os.close(b)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=child_fds, close_fds=False)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.pipe = _Pipe(self.proc, self._to_w, self._from_r, timeout)
        self.timeout = timeout
        try:
            target = self.pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            self.navigate(fragment)
        except BaseException:
            self.close()
            raise

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.pipe.send(method, params, session=self.session)

    def navigate(self, fragment: str = "", path: str | Path | None = None) -> None:
        """Load the page (again, or the file ``path`` from now on) with this fragment, in a fresh
        document (via about:blank: a fragment change alone would not reload), and wait for ``load``."""
        if path is not None:
            self.url = _as_url(path)
        url = self.url + ("#" + fragment.lstrip("#") if fragment else "")
        self.send("Page.navigate", {"url": "about:blank"})
        self.pipe.wait_event("Page.loadEventFired")
        self.send("Page.navigate", {"url": url})
        self.pipe.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """The JSON value of a JS expression (promises awaited); a thrown exception raises."""
        r = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS exception in {expression[:80]!r}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None, interval: float = 0.05):
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            v = self.evaluate(expression)
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {expression!r}; errors: {self.errors()}")
            time.sleep(interval)

    def key(self, key: str, code: int) -> None:
        """Press and release one key in the focused element (``key("ArrowLeft", 37)``)."""
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                 "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code})

    def move(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, x: float, y: float) -> None:
        """A left click (move, press, release) at page coordinates (CSS pixels)."""
        self.move(x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    @property
    def fragment(self) -> str:
        return self.evaluate("location.hash").lstrip("#")

    def screenshot(self, clip: dict | None = None, full_page: bool = False) -> bytes:
        """PNG bytes: the viewport, a clip ``{x, y, width, height}``, or the whole page."""
        params: dict = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            clip = {"x": 0, "y": 0, "width": self.width, "height": int(min(size["height"], 16000))}
            params["captureBeyondViewport"] = True
        if clip:
            params["clip"] = dict(clip, scale=1)
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    def errors(self) -> list[str]:
        return _collect_errors(self.pipe.events)

    def close(self) -> None:
        try:
            self.pipe.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_w, self._from_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_page(path: str | Path, width: int = 1200, timeout: float = 60.0, chromium: str | None = None) -> PageCheck:
    """Load ``path`` in headless Chromium; return decode results, errors and a full-page screenshot."""
    result = PageCheck()
    with Page(path, width=width, timeout=timeout, chromium=chromium) as page:
        r = page.send("Runtime.evaluate", {"expression": _CHECK_JS, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in r:
            result.errors.append(f"check script failed: {r['exceptionDetails']}")
        value = r.get("result", {}).get("value") or {}
        result.images, result.decoded = value.get("images", 0), value.get("decoded", 0)
        result.page_attrs = value.get("attrs", {})
        result.screenshot = page.screenshot(full_page=True)
        result.errors += page.errors()
    return result
