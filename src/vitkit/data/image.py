"""Reading images safely: clear errors for missing, corrupt or oversized files.

``load_image(path)`` returns a PIL image in the requested mode. Pillow's own decompression-bomb
guard is kept and tightened to ``max_pixels`` (default 100 megapixels, or ``VITKIT_MAX_IMAGE_PIXELS``): a larger image is refused
with a message before it is decoded. ``builtin_image`` gives real images that ship with
scikit-learn (``sample:china.jpg``, ``sample:flower.jpg``, ``digits:N``), so demos and tests
need no download.

High bit depth: Pillow opens 16-bit grayscale PNG/TIFF as mode ``I;16`` (``I;16B``, ``I`` in some
versions), and ``convert("L")`` then *clips* at 255 (a 0..65535 gradient becomes 0, 255, 255, ...).
``load_image`` scales such images to 8 bits first with ``to_uint8``: v -> round(v / 257), i.e.
v * 255/65535 rounded, which maps 65535 to 255 and an 8-bit value stored as 16 bits (k * 257) back
to k exactly. 16-bit RGB(A) / LA PNGs need nothing: Pillow already keeps their high byte.
``to_uint8`` also takes tensors, so a decoder that returns ``torch.uint16`` (torchvision's
``decode_image`` on a 16-bit PNG) gives the same 8-bit values as ``load_image``.

EXIF orientation: a phone photo is stored sideways with an orientation tag (6: turn 90 degrees
clockwise to view). Every decoder applies it the way PIL's ``ImageOps.exif_transpose`` does:
``load_image`` (predict, explain, summary) with the same PIL transposes, and
``vitkit.data.files.decode_bytes`` (training, evaluation, embed) on the decoded tensor; both read the
tag with ``exif_orientation`` before any pixel is decoded, so the paths cannot disagree.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from ..errors import InputError

DEFAULT_MAX_PIXELS = 100_000_000
# Pillow's limit is a module global: load_image calls from threads of one process (a thread pool,
# a server; DataLoader workers are processes) must not restore each other's swapped value, so the
# header read holds this lock. Another library's Image.open in that window still sees no limit.
_PIL_LIMIT_LOCK = threading.Lock()


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# PIL's ImageOps.exif_transpose table: EXIF orientation -> the transpose that shows the image upright
# (vitkit.data.files.orient_tensor is the same table on (C, H, W) tensors).
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8, 1 = upright as stored) of an opened, not yet decoded image, read
    as ``ImageOps.exif_transpose`` reads it (the EXIF tag, else XMP's tiff:Orientation). A PNG counts
    only the chunks before its image data: Pillow's PNG reader would decode the whole image to look
    for an eXIf chunk after it (rare), which every header read would pay for."""
    try:
        if img.format == "PNG" and "exif" not in img.info:
            exif = Image.Image.getexif(img)  # the base reader: only what the header chunks hold
        else:
            exif = img.getexif()
        value = exif.get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, struct.error):
        return 1  # an unreadable EXIF block: shown as stored, as image viewers do
    return value if isinstance(value, int) and value in EXIF_TRANSPOSE else 1


def to_uint8(x):
    """8-bit values from an image array or tensor: uint8 unchanged; 16-bit (uint16, or a wider int
    holding 0..65535, as Pillow's mode "I") -> round(v / 257) clipped to 0..255. numpy in, numpy out;
    torch in, torch out (same shape)."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            return x
        if x.dtype.kind not in "iu":
            raise InputError(f"to_uint8: expected integer image values, got dtype {x.dtype}")
        v = np.clip(x.astype(np.int64), 0, 65535)
        return ((v + 128) // 257).astype(np.uint8)
    import torch

    if x.dtype == torch.uint8:
        return x
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise InputError(f"to_uint8: expected integer image values, got dtype {x.dtype}")
    v = x.to(torch.int32).clamp_(0, 65535)  # uint16 supports few ops; int32 holds every value
    return torch.div(v + 128, 257, rounding_mode="floor").to(torch.uint8)


def load_image(path: str | Path, mode: str | None = "RGB", max_pixels: int | None = None) -> Image.Image:
    """Open, check and decode one image file. Raises InputError naming the file on any problem.

    ``max_pixels`` None: ``VITKIT_MAX_IMAGE_PIXELS`` from the environment (read at each call, so
    it reaches training's DataLoader workers too), else 100 megapixels."""
    if max_pixels is None:
        max_pixels = int(os.environ.get("VITKIT_MAX_IMAGE_PIXELS", "") or DEFAULT_MAX_PIXELS)
    spec = str(path)
    if spec.startswith(("sample:", "digits:")):
        img = builtin_image(spec)
        return img.convert(mode) if mode else img
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an image file")
    try:
        with warnings.catch_warnings():
            # Pillow's own guard (89.5 Mpx warning, 2x that an error) would override max_pixels both
            # ways. Image.open reads only the header, so switch it off there and apply our limit
            # just below, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _PIL_LIMIT_LOCK:
                pil_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    img = Image.open(p)
                finally:
                    Image.MAX_IMAGE_PIXELS = pil_limit
            orientation = exif_orientation(img)  # before load(): what decode_bytes sees from the header
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(
                    f"{p}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                    "downscale it first, or raise the limit: --max-pixels N (predict, explain) or the "
                    "environment variable VITKIT_MAX_IMAGE_PIXELS=N (every command, training included)"
                )
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{p}: image too large to decode safely, over the limit of {max_pixels:,} pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{p}: not a readable image file (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{p}: cannot decode image ({e})") from e
    if img.mode in HIGH_BIT_MODES:  # 16-bit grey: scale, don't let convert() clip at 255
        img = Image.fromarray(to_uint8(np.asarray(img)))
    if orientation != 1:
        img = img.transpose(EXIF_TRANSPOSE[orientation])
    return img.convert(mode) if mode else img


def builtin_image(spec: str) -> Image.Image:
    """A real image that ships with scikit-learn: ``sample:china.jpg``, ``sample:flower.jpg``
    (427x640 RGB) or ``digits:N`` (the N-th 8x8 handwritten digit, grey, values 0..16 -> 0..255)."""
    kind, _, arg = spec.partition(":")
    if kind == "sample":
        from sklearn.datasets import load_sample_image

        name = arg or "china.jpg"
        try:
            return Image.fromarray(load_sample_image(name))
        except (AttributeError, OSError, ValueError) as e:
            raise InputError(f"unknown sample image {name!r}; use sample:china.jpg or sample:flower.jpg") from e
    if kind == "digits":
        from sklearn.datasets import load_digits

        images = load_digits().images
        try:
            i = int(arg or 0)
            arr = images[i]
        except (ValueError, IndexError) as e:
            raise InputError(f"digits:N needs N in 0..{len(images) - 1}, got {arg!r}") from e
        return Image.fromarray((arr * (255.0 / 16.0)).round().astype(np.uint8))  # 2-D uint8 -> "L"
    raise InputError(f"unknown built-in image {spec!r}; use sample:china.jpg, sample:flower.jpg or digits:N")
