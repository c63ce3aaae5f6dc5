"""Regenerate docs/images/explore_digits.png: a headless-Chromium screenshot of explore.html for
a digits model, in a chosen state (URL fragment).

    make demo                                   # or: vitkit train --out runs/demo
    vitkit explain digits:7 --out explain_out   # writes explain_out/explore.html too
    python docs/images/make_explore_screenshot.py explain_out/explore.html "layer=3&head=mean&patch=mean&mode=attention"
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from vitkit.viz.browser import Page


def main(page: str, fragment: str = "", out: str = str(Path(__file__).with_name("explore_digits.png")),
         width: int = 1000, height: int = 640, scale: float = 0.7) -> None:
    with Page(page, fragment=fragment, width=width, height=height) as p:
        state = p.wait_for("document.body.dataset.ready || document.body.dataset.error || ''")
        if state != "1" or p.errors():
            raise SystemExit(f"explore.html did not render cleanly: {state} {p.errors()}")
        shot = p.screenshot()
        frag = p.fragment
    img = Image.open(io.BytesIO(shot)).convert("RGB")
    img = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
    img = img.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # small file for the README
    img.save(out, optimize=True)
    print(f"{out}: {img.width}x{img.height}, state #{frag}, no errors")


if __name__ == "__main__":
    main(*sys.argv[1:4] or ["explain_out/explore.html"])  # PAGE [FRAGMENT [OUT]]
