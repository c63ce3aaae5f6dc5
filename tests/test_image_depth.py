"""16-bit images are scaled to 8 bits (round(v / 257)), not clipped, on every path that reads
image files (load_image: training datasets, predict, explain), and to_uint8 gives the same values
for torchvision's uint16 decode of the same PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.image import load_image, to_uint8


def _gradient16(path, n=16):
    v = np.linspace(0, 65535, n * n).round().astype(np.uint16).reshape(n, n)
    Image.fromarray(v).save(path)  # mode I;16 -> a 16-bit grayscale PNG
    return v


def _expect(v):  # hand-computed: v * 255 / 65535 rounded half up
    return np.floor(v.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGB", None])
def test_16bit_png_scaled_not_saturated(tmp_path, mode):
    v = _gradient16(tmp_path / "g.png")
    got = np.asarray(load_image(tmp_path / "g.png", mode=mode))
    want = _expect(v)
    if mode == "RGB":
        want = np.repeat(want[..., None], 3, axis=2)
    np.testing.assert_array_equal(got, want)
    assert got.max() == 255 and got.min() == 0 and len(np.unique(got)) > 200


def test_8bit_values_stored_as_16_bits_come_back_exactly():
    k = np.arange(256, dtype=np.uint16)
    np.testing.assert_array_equal(to_uint8(k * 257), k.astype(np.uint8))
    np.testing.assert_array_equal(to_uint8(k.astype(np.uint8)), k)  # uint8 unchanged


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 points at torchcodec; same decode
def test_to_uint8_on_torchvision_uint16_decode_matches_load_image(tmp_path):
    from torchvision.io import decode_image, read_file

    _gradient16(tmp_path / "g.png")
    t = decode_image(read_file(str(tmp_path / "g.png")))
    assert t.dtype == torch.uint16  # what a worker-side PNG decode hands over
    out = to_uint8(t)
    assert out.dtype == torch.uint8 and out.shape == t.shape
    np.testing.assert_array_equal(out[0].numpy(), np.asarray(load_image(tmp_path / "g.png", mode="L")))


def test_imagefolder_training_reads_16bit_images_scaled(tmp_path):
    from vitkit.data import DataSpec, build_data, make_loader

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(4):
            v = _gradient16(tmp_path / "train" / c / f"{i}.png", n=8)
    data = build_data(DataSpec(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, val_fraction=0.5))
    x, _ = next(iter(make_loader(data.train, batch_size=1, train=False, workers=0, normalize=False)))
    x = x[0]  # (C, 8, 8) float in [0, 1] as training reads it (decoded by the loader), no resize at the native size
    want = torch.from_numpy(_expect(v)).float() / 255
    torch.testing.assert_close(x[0], want, atol=1e-6, rtol=0)
