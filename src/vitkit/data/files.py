"""Decoding image files and bytes into uint8 tensors, inside DataLoader workers.

``decode_bytes`` reads the header with Pillow first (format, size: an image over the pixel limit is
refused before anything is decoded), then decodes JPEG / PNG / WebP with ``torchvision.io``
(libjpeg-turbo / libpng straight into a (C, H, W) uint8 tensor, no PIL round trip) and every other
format Pillow reads (BMP, TIFF, GIF, PPM ...) with ``vitkit.data.image.load_image``'s rules.
High-bit-depth images (16-bit PNG / TIFF) are scaled to 8 bits with ``vitkit.data.image.to_uint8``
(round(v / 257), the same as ``load_image`` for predict and explain), never clipped. The EXIF
orientation is read from the header (``vitkit.data.image.exif_orientation``) and applied to the
decoded tensor (``orient_tensor``), as ``load_image`` applies it to the PIL image; header sizes are
the upright sizes. Grey WebP and animated WebP go to Pillow (torchvision's WebP decoder has no grey
mode, only a C++ warning, and refuses animations; Pillow reads the first frame, as predict does).

Every failure is an ``InputError`` whose message starts with the file's name.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch

from ..errors import InputError
from .image import _PIL_LIMIT_LOCK, DEFAULT_MAX_PIXELS, exif_orientation, to_uint8

# Formats torchvision.io decodes itself (faster than PIL and no PIL -> tensor copy).
_TV_FORMATS = {"JPEG", "PNG", "WEBP"}


def read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as e:
        raise _open_error(p, e) from None


def _open_error(p: Path, e: OSError) -> InputError:
    """The InputError for a file that cannot be opened: missing, a directory, or unreadable."""
    if isinstance(e, FileNotFoundError):
        return InputError(f"{p}: no such file")
    if isinstance(e, IsADirectoryError):
        return InputError(f"{p}: is a directory, expected an image file")
    return InputError(f"{p}: cannot read ({e.strerror or e})")


def max_pixels_limit() -> int:
    """The pixel limit ``load_image`` applies: VITKIT_MAX_IMAGE_PIXELS, else 100 megapixels (read at
    each call: the environment reaches the DataLoader workers)."""
    return int(os.environ.get("VITKIT_MAX_IMAGE_PIXELS", "") or DEFAULT_MAX_PIXELS)


def orient_tensor(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright for EXIF ``orientation``: ``ImageOps.exif_transpose``'s
    transposes (vitkit.data.image.EXIF_TRANSPOSE) on a tensor (5-8 swap H and W)."""
    if orientation in (5, 6, 7, 8):
        x = x.transpose(-2, -1)  # 5: PIL's TRANSPOSE; 6-8 add a flip
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return x.flip(flips) if flips else x


def image_header(data, name: str, max_pixels: int | None = None):
    """(format, (width, height) upright, after the EXIF orientation) from the header only (``data``:
    bytes or a binary file object); InputError naming ``name`` if unreadable."""
    fmt, (w, h), orientation, _ = _header(data, name, max_pixels)
    return fmt, ((h, w) if orientation >= 5 else (w, h))


def _header(data, name: str, max_pixels: int | None = None):
    """(format, (width, height) as stored, EXIF orientation, animated) from the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _PIL_LIMIT_LOCK:  # Pillow's own limit off for the header read: ours (below) applies
                pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
                finally:
                    Image.MAX_IMAGE_PIXELS = pil_limit
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a readable image file (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: cannot read the image header ({e})") from None
    w, h = img.size
    max_pixels = max_pixels or max_pixels_limit()
    if w * h > max_pixels:
        raise InputError(f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                         "downscale it first, or raise the limit with the environment variable "
                         "VITKIT_MAX_IMAGE_PIXELS=N")
    return img.format, (w, h), exif_orientation(img), bool(getattr(img, "is_animated", False))


def decode_bytes(data: bytes, name: str, channels: int = 3, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (channels, H, W). ``name`` is used in error messages."""
    ImageReadMode, decode_image = _tv_decoder()
    fmt, _, orientation, animated = _header(data, name, max_pixels)
    if fmt in _TV_FORMATS and not (fmt == "WEBP" and (channels == 1 or animated)):
        try:
            x = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
        except RuntimeError as e:
            raise InputError(f"{name}: cannot decode image ({str(e).splitlines()[0]})") from None
    else:
        x = _decode_pil(data, name, channels)
    if x.dtype != torch.uint8:  # 16-bit PNG: round(v / 257), as load_image (predict) does
        x = to_uint8(x)
    return orient_tensor(x, orientation)


# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (not a dependency here);
# they are libjpeg-turbo / libpng / libwebp and still the fastest path we have. Only that message is hidden.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _tv_decoder():
    from torchvision.io import ImageReadMode, decode_image

    return ImageReadMode, decode_image


def _decode_pil(data: bytes, name: str, channels: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: cannot decode image ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # high bit depth grey: round(v / 257), as load_image
        img = Image.fromarray(to_uint8(np.asarray(img)))
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def file_header(path: str | Path, max_pixels: int | None = None):
    """``image_header`` of a file, reading only the bytes the header needs."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return image_header(f, str(p), max_pixels)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise _open_error(p, e) from None


def decode_file(path: str | Path, channels: int = 3, max_pixels: int | None = None) -> torch.Tensor:
    return decode_bytes(read_bytes(path), str(path), channels, max_pixels)


def probe_sizes(paths, k: int = 32) -> list[tuple[int, int]]:
    """(H, W) of up to ``k`` files spread over ``paths`` (header reads only)."""
    paths = list(paths)
    if not paths:
        return []
    step = max(1, len(paths) // k)
    out = []
    for p in paths[::step][:k]:
        try:
            _, (w, h) = file_header(p)
        except InputError:
            continue  # reported by the file checks / in the workers, not here
        out.append((h, w))
    return out
