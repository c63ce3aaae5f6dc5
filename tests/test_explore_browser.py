"""explore.html in a real browser (headless Chromium over the DevTools pipe, one browser for the
module): it loads with no console errors; clicking a patch, a register, moving the layer slider
with the keyboard and choosing a head change the rendered pixels and the fragment; the state
reached by interaction renders the same pixels as the same state opened from its fragment; the
numbers the page shows are the shipped maps (decoded here independently). Skipped when chromium is
not installed (.ci/run installs it)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import vitkit
from vitkit.viz.browser import Page, find_chromium
from vitkit.viz.explore import dequantise_rows, dequantise_signed, explore_data, render_explore

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium not installed (Debian: apt-get install chromium; .ci/run does it)")

HASH_JS = """(() => { const c = document.getElementById('view');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 2166136261; for (let i = 0; i < d.length; i++) { h ^= d[i]; h = Math.imul(h, 16777619); }
  return (h >>> 0).toString(16) + ' ' + c.width + 'x' + c.height; })()"""
READY = "document.body.dataset.ready || document.body.dataset.error || ''"


def _model(**cfg):
    torch.manual_seed(0)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=(24, 32), patch_size=8, in_channels=3, num_classes=6, dim=16,
                                             depth=3, num_heads=2, **cfg))
    with torch.no_grad():  # sharper attention than the init, so maps have a clear maximum
        for b in m.blocks:
            b.attn.qkv.weight.mul_(15)
    return m


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    x = torch.rand(1, 3, 24, 32) * 2 - 1
    out = {}
    kinds = {"reg": dict(num_registers=2), "mean": dict(class_token=False, pooling="mean"),
             "map": dict(class_token=False, pooling="map")}
    for name, cfg in kinds.items():
        meta, arrays = explore_data(_model(**cfg), x, classes=2)
        path = root / f"{name}.html"
        path.write_text(render_explore(meta, arrays))
        out[name] = (path, meta, arrays)
    return out


@pytest.fixture(scope="module")
def page(pages):
    with Page(pages["reg"][0], width=1100, height=800) as p:
        assert p.wait_for(READY) == "1"
        yield p


def _patch_xy(page, meta, patch):
    left, top, w, h = page.evaluate("(() => { const r = document.getElementById('view').getBoundingClientRect();"
                                    " return [r.left, r.top, r.width, r.height]; })()")
    gh, gw = meta["grid"]
    i, j = divmod(patch, gw)
    return left + (j + 0.5) * w / gw, top + (i + 0.5) * h / gh


def _shown_max(page):
    """(max value over the patches, its patch index) as the page prints them."""
    text = page.evaluate("document.getElementById('info').textContent")
    m = re.search(r"max (-?[\d.]+) \(patch (\d+)\)", text)
    return float(m.group(1)), int(m.group(2))


def test_interactions_change_pixels_and_fragment_and_reopen_identically(page, pages):
    _, meta, arrays = pages["reg"]
    assert page.errors() == []
    top_class = meta["classes"][0]["index"]
    assert page.fragment == f"layer=2&head=mean&patch=cls&mode=attention&class={top_class}"  # readout: cls
    h0 = page.evaluate(HASH_JS)
    page.click(*_patch_xy(page, meta, 5))
    assert page.fragment.startswith("layer=2&head=mean&patch=5&")
    h1 = page.evaluate(HASH_JS)
    assert h1 != h0
    frag = page.fragment
    page.move(*_patch_xy(page, meta, 7))  # hovering previews another query, without selecting it
    assert page.evaluate(HASH_JS) not in (h1, h0) and page.fragment == frag
    page.move(2, 2)  # off the canvas: back to the selected patch
    assert page.evaluate(HASH_JS) == h1
    page.evaluate("document.getElementById('layer').focus()")
    page.key("ArrowLeft", 37)  # the slider, moved by the keyboard
    assert page.fragment.startswith("layer=1&head=mean&patch=5&")
    h2 = page.evaluate(HASH_JS)
    assert h2 != h1
    page.evaluate("(() => { const s = document.getElementById('head'); s.value = '1';"
                  " s.dispatchEvent(new Event('change')); })()")
    page.click(*page.evaluate("(() => { const b = document.querySelector('#prefix button[data-q=reg1]');"
                              " const r = b.getBoundingClientRect(); return [r.left + 5, r.top + 5]; })()"))
    frag = page.fragment
    assert frag == f"layer=1&head=1&patch=reg1&mode=attention&class={top_class}"
    h3 = page.evaluate(HASH_JS)
    assert h3 not in (h0, h1, h2)
    # what the page shows is the shipped row: register 1 (token 2) at layer 1, head 1
    row = dequantise_rows(arrays["attn_q"][1, 1, 2], arrays["attn_s"][1, 1, 2])[3:]
    v, k = _shown_max(page)
    assert k == int(np.argmax(row)) and abs(v - row.max()) < 1e-4
    # the same state opened from its fragment renders the same pixels
    page.navigate(frag)
    assert page.wait_for(READY) == "1"
    assert page.fragment == frag
    assert page.evaluate(HASH_JS) == h3
    assert page.errors() == []


def test_every_mode_from_the_fragment_shows_its_map(page, pages):
    _, meta, arrays = pages["reg"]
    k = meta["classes"][1]["index"]
    shown = {}
    for mode in ("attention", "rollout", "attribution", "similarity"):
        frag = f"layer=1&head=mean&patch=4&mode={mode}&class={k}"
        page.navigate(frag)
        assert page.wait_for(READY) == "1" and page.fragment == frag
        shown[mode] = page.evaluate(HASH_JS)
        t = 3 + 4  # 3 prefix tokens, patch 4
        if mode == "attention":
            row = np.mean([dequantise_rows(arrays["attn_q"][1, h, t], arrays["attn_s"][1, h, t]) for h in range(2)], 0)
        elif mode == "rollout":
            row = dequantise_rows(arrays["roll_q"][1, t], arrays["roll_s"][1, t])
        elif mode == "attribution":
            row = dequantise_rows(arrays["attr_q"][1, 1, t], arrays["attr_s"][1, 1, t])
        else:
            row = dequantise_signed(arrays["sim_q"][1, t])
        v, top = _shown_max(page)
        assert top == int(np.argmax(row[3:])) and abs(v - row[3:].max()) < 1e-4, mode
    assert len(set(shown.values())) == 4
    page.navigate("layer=99&head=x&patch=nope&mode=attention")  # bad values: ignored with a warning
    assert page.wait_for(READY) == "1"
    assert page.fragment.startswith("layer=2&head=mean&patch=cls&mode=attention")
    assert page.errors() == []


def test_mean_readout_page(page, pages):
    path, meta, arrays = pages["mean"]
    assert meta["readout"] == "mean" and meta["prefix"] == []
    page.navigate("layer=0&head=0&mode=attention", path=path)
    assert page.wait_for(READY) == "1"
    assert page.fragment.startswith("layer=0&head=0&patch=mean&mode=attention")
    rows = dequantise_rows(arrays["attn_q"][0, 0], arrays["attn_s"][0, 0])  # (T, T), no prefix
    row = rows.mean(axis=0)  # the readout of mean pooling: the mean over the patch queries
    v, top = _shown_max(page)
    assert top == int(np.argmax(row)) and abs(v - row.max()) < 1e-4
    assert page.errors() == []


def test_map_readout_page(page, pages):
    path, meta, arrays = pages["map"]
    assert meta["readout"] == "map"
    for head in (1, "mean"):
        page.navigate(f"layer=0&head={head}&mode=attention", path=path)
        assert page.wait_for(READY) == "1"
        assert page.fragment.startswith(f"layer=0&head={head}&patch=map&mode=attention")
        row = arrays["pool"][1] if head == 1 else arrays["pool"].mean(0)  # the pooling head's own weights
        v, top = _shown_max(page)
        assert top == int(np.argmax(row)) and abs(v - row.max()) < 1e-4
    assert page.errors() == []


def test_served_page_asks_the_server_for_each_row():
    """vitkit explore's page: every row comes from the local server at full precision, equal to the
    model's own maps; clicks and the fragment work as on the static page; console clean."""
    from vitkit.viz.serve import ExploreState, query_row, serve_in_thread

    m = _model(num_registers=2)
    state = ExploreState(m, torch.rand(3, 24, 32) * 2 - 1, classes=2)
    assert '"attn_q"' not in state.page.decode() and state.meta["encoding"] == "served"  # no map shipped
    server, url = serve_in_thread(state)
    try:
        with Page(url, fragment="layer=1&head=1&patch=reg1&mode=attention", width=1100, height=800) as p:
            assert p.wait_for(READY) == "1"
            row = state.maps["attention"][1, 1, 2, 3:]  # register 1 = token 2; the patch keys
            v, k = _shown_max(p)
            assert k == int(np.argmax(row)) and abs(v - row.max()) < 1e-4
            meta = state.meta
            h0 = p.evaluate(HASH_JS)
            p.click(*_patch_xy(p, meta, 5))
            assert p.wait_for("(document.body.dataset.state || '').includes('patch=5') ? '1' : ''") == "1"
            assert p.fragment.startswith("layer=1&head=1&patch=5&")
            assert p.evaluate(HASH_JS) != h0
            for mode, patch in (("rollout", 4), ("similarity", "cls"), ("attribution", 7)):
                p.navigate(f"layer=0&head=mean&patch={patch}&mode={mode}&class={meta['classes'][1]['index']}")
                assert p.wait_for(READY) == "1"
                want = query_row(meta, state.maps, mode, 0, "mean", patch, meta["classes"][1]["index"])[3:]
                v, k = _shown_max(p)
                assert k == int(np.argmax(want)) and abs(v - want.max()) < 1e-4, mode
            assert p.errors() == []
    finally:
        server.shutdown()
        server.server_close()
