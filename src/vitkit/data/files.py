"""Decoding image files and bytes into uint8 tensors, inside DataLoader workers.

``decode_bytes`` reads the header with Pillow first (format, size: an image over the pixel limit is
refused before anything is decoded), then decodes JPEG / PNG / WebP with ``torchvision.io``
(libjpeg-turbo / libpng straight into a (C, H, W) uint8 tensor, no PIL round trip) and every other
format Pillow reads (BMP, TIFF, GIF, PPM ...) with ``vitkit.data.image.load_image``'s rules.
High-bit-depth images (16-bit PNG) are scaled to 8 bits (65535 -> 255), never clipped.

Every failure is an ``InputError`` whose message starts with the file's name.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from ..errors import InputError
from .image import DEFAULT_MAX_PIXELS

# Formats torchvision.io decodes itself (faster than PIL and no PIL -> tensor copy).
_TV_FORMATS = {"JPEG", "PNG", "WEBP"}


def read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, expected an image file") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None


def image_header(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """(format, (width, height)) from the header only; InputError naming ``name`` if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning; its hard error (2x its limit) still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a readable image file (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: cannot read the image header ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                         "downscale it first")
    return img.format, (w, h)


def decode_bytes(data: bytes, name: str, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (channels, H, W). ``name`` is used in error messages."""
    from torchvision.transforms.v2 import functional as F

    ImageReadMode, decode_image = _tv_decoder()
    fmt, _ = image_header(data, name, max_pixels)
    if fmt in _TV_FORMATS:
        try:
            x = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
        except RuntimeError as e:
            raise InputError(f"{name}: cannot decode image ({str(e).splitlines()[0]})") from None
    else:
        x = _decode_pil(data, name, channels)
    if x.dtype != torch.uint8:  # 16-bit PNG: scale, do not clip
        x = F.to_dtype(x, torch.uint8, scale=True)
    return x


def _tv_decoder():
    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (not a dependency here);
    # they are libjpeg-turbo / libpng and still the fastest path we have.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
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
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # high bit depth grey: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_file(path: str | Path, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
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
            _, (w, h) = image_header(read_bytes(p), str(p))
        except InputError:
            continue  # reported by the file checks / in the workers, not here
        out.append((h, w))
    return out
