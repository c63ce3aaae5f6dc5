"""The HTML report in a real browser (headless Chromium over the DevTools pipe): it loads with no
console errors, every image decodes, and the screenshot is not blank. A deliberately broken page
shows the check can fail. Skipped when chromium is not installed (.ci/run installs it)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit import viz
from vitkit.viz.browser import check_page, find_chromium

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium not installed (Debian: apt-get install chromium; .ci/run does it)")


def test_report_renders_in_chromium(tmp_path):
    torch.manual_seed(0)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=32, patch_size=8, in_channels=3, num_classes=4, dim=16,
                                             depth=2, num_heads=2))
    ex = viz.explain(m, "sample:flower.jpg", compare="sample:china.jpg")  # 8 figures + PCA, norms, correspondence
    html = viz.write_report(ex, tmp_path / "r")
    res = check_page(html)
    assert res.errors == []
    assert res.images == len(ex.figures) == 11
    assert res.decoded == res.images
    assert res.page_attrs.get("data-decoded") == "11/11"  # the report's own script agrees
    assert res.page_attrs.get("data-errors") == "0"
    shot = np.asarray(Image.open(io.BytesIO(res.screenshot)).convert("L"), dtype=float)
    assert shot.shape[0] > 2000  # the whole page, not just the first screen
    assert shot.std() > 20  # not blank


def test_broken_page_is_caught(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><img src='data:image/png;base64,AAAA'>"
                   "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    res = check_page(bad)
    assert res.images == 1 and res.decoded == 0
    assert any("boom" in e for e in res.errors)
    assert any("undefinedFunction" in e for e in res.errors)
