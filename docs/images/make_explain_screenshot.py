"""Regenerate docs/images/explain_report.png: a headless-Chromium screenshot of the
`vitkit explain` report for a digits model.

    make demo                                   # or: vitkit train --out runs/demo
    vitkit explain digits:7 --out explain_out   # uses the latest run under runs/
    python docs/images/make_explain_screenshot.py explain_out/report.html
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from vitkit.viz.browser import check_page


def main(report: str, out: str = str(Path(__file__).with_name("explain_report.png")), width: int = 1000,
         scale: float = 0.6) -> None:
    res = check_page(report, width=width)
    if res.errors or res.decoded != res.images:
        raise SystemExit(f"report did not render cleanly: {res.decoded}/{res.images} images, errors {res.errors}")
    img = Image.open(io.BytesIO(res.screenshot)).convert("RGB")
    img = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
    img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT)  # small file for the README
    img.save(out, optimize=True)
    print(f"{out}: {img.width}x{img.height}, {res.decoded}/{res.images} images decoded, no errors")


if __name__ == "__main__":
    main(*sys.argv[1:2] or ["explain_out/report.html"])
