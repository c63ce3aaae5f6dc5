"""``vitkit explore``: explore.html served from 127.0.0.1, each view computed on request.

The static page must ship every row of every map, so its size grows with tokens squared (and
large models get the compact encoding, see :mod:`vitkit.viz.explore`). Served, the model's maps
stay in this process at full precision (float32) and the page asks for the one row it draws:
``GET /row?mode=M&layer=L&head=H&patch=P&class=K`` answers the query row (T float32, little-endian)
exactly as the static page's script would compute it from decoded rows (:func:`query_row`). The
page itself is the static page's script with ``meta.served`` set; the dense-feature views (small)
are shipped in it as usual. Only 127.0.0.1 is bound by default: the page shows your image.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from ..errors import InputError


class ExploreState:
    """Everything one served page needs: the page's meta and small arrays, and the full maps."""

    def __init__(self, model, image, topk: int = 5, classes: int = 3, compare=None, title: str = "vitkit explore"):
        from .explore import render_explore
        from .patches import sized_to_input
        from .report import prepare_image

        x, _ = prepare_image(model, image)
        xb = None if compare is None else prepare_image(model, compare)[0]
        model = sized_to_input(model, x)
        self.maps: dict[str, np.ndarray] = {}
        from .explore import explore_data

        self.meta, arrays = explore_data(model, x, topk=topk, classes=classes, compare=xb, encoding="served",
                                         keep=self.maps)
        self.meta["served"] = True
        self.maps["pool"] = arrays.get("pool")
        self.maps["norms"] = arrays["norms"]
        self.page = render_explore(self.meta, arrays, title, budget=None).encode("utf-8")

    def row(self, mode: str, layer: int, head: int | str, patch: int | str, cls: int | None) -> np.ndarray:
        return query_row(self.meta, self.maps, mode, layer, head, patch, cls)


def query_row(meta: dict[str, Any], maps: dict[str, np.ndarray], mode: str, layer: int, head: int | str,
              patch: int | str, cls: int | None = None) -> np.ndarray:
    """The row (T,) the page draws for a view, from the full maps: the query token's row of the
    mode's (T, T) matrix at ``layer`` (attention: ``head`` or the head mean), the mean over the
    patch queries' rows for ``patch="mean"``, the pooling head's weights (attention) or its
    head-mean weights mixing the rows (other modes) for ``patch="map"``."""
    L, H, T = meta["layers"], meta["heads"], meta["tokens"]
    prefix, R = meta["prefix"], len(meta["prefix"])
    if not 0 <= layer < L:
        raise InputError(f"layer {layer} out of range 0..{L - 1}")
    if head != "mean" and not (isinstance(head, int) and 0 <= head < H):
        raise InputError(f"head must be 0..{H - 1} or 'mean', got {head!r}")
    if mode == "attention":
        A = maps["attention"][layer]
        M = A.mean(0) if head == "mean" else A[head]
    elif mode == "rollout":
        M = maps["rollout"][layer]
    elif mode == "attribution":
        ranks = [c["index"] for c in meta["classes"]]
        if cls not in ranks:
            raise InputError(f"class must be one of {ranks}, got {cls!r}")
        M = maps["attribution"][ranks.index(cls), layer]
    elif mode == "similarity":
        M = maps["similarity"][layer]
    elif mode == "norms":
        return maps["norms"][layer].astype(np.float32)
    else:
        raise InputError(f"mode must be attention, rollout, attribution, similarity or norms, got {mode!r}")
    if patch == "mean":
        return M[R:].mean(0).astype(np.float32)
    if patch == "map":
        pool = maps.get("pool")
        if pool is None:
            raise InputError("patch 'map' needs a model with attention pooling")
        if mode == "attention":
            return (pool.mean(0) if head == "mean" else pool[head]).astype(np.float32)
        return (pool.mean(0) @ M).astype(np.float32)
    t = R + patch if isinstance(patch, int) else (prefix.index(patch) if patch in prefix else -1)
    if not 0 <= t < T or (isinstance(patch, int) and patch < 0):
        raise InputError(f"patch must be 0..{T - R - 1}, {', '.join(prefix) or 'no prefix token'}, mean or map; got {patch!r}")
    return M[t].astype(np.float32)


def _parse(q: dict[str, list[str]]) -> tuple[str, int, int | str, int | str, int | None]:
    def one(name, default=None):
        v = q.get(name, [default])[0]
        if v is None:
            raise InputError(f"missing {name}")
        return v

    as_int = lambda v: int(v) if v.lstrip("-").isdigit() else v  # noqa: E731
    cls = q.get("class", [None])[0]
    return (one("mode"), int(one("layer")), as_int(one("head", "mean")), as_int(one("patch")),
            None if cls in (None, "", "null") else int(cls))


class _Handler(BaseHTTPRequestHandler):
    state: ExploreState

    def log_message(self, *args) -> None:  # one line per request on stderr is noise for a local page
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        if url.path in ("/", "/explore.html"):
            return self._send(200, self.state.page, "text/html; charset=utf-8")
        if url.path == "/row":
            try:
                row = self.state.row(*_parse(parse_qs(url.query)))
            except (InputError, ValueError) as e:
                return self._send(400, str(e).encode(), "text/plain; charset=utf-8")
            return self._send(200, np.ascontiguousarray(row, dtype="<f4").tobytes(), "application/octet-stream")
        if url.path == "/favicon.ico":  # browsers ask; a 404 would be a console error
            return self._send(204, b"", "image/x-icon")
        return self._send(404, b"not found", "text/plain")


def make_server(state: ExploreState, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``state`` (port 0: any free port; see ``server.server_address``)."""
    handler = type("Handler", (_Handler,), {"state": state})
    return ThreadingHTTPServer((host, port), handler)


def serve_in_thread(state: ExploreState, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a daemon thread; returns ``(server, url)``. ``server.shutdown()`` stops it."""
    server = make_server(state, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/"
