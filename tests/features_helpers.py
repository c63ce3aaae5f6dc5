"""Shared pieces of the tests/test_features_*.py files: scikit-learn digits written as PNG class
folders, and a tiny random ViT saved as a vitkit model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_digits(root: Path, per_class: int = 4, classes: int = 10, start: int = 0) -> list[Path]:
    """``root/<digit>/<index>.png`` (8x8 grey upscaled to 16x16 RGB), ``per_class`` of each digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    files, count = [], {c: 0 for c in range(classes)}
    for i in range(start, len(d.target)):
        c = int(d.target[i])
        if c >= classes or count[c] >= per_class:
            continue
        count[c] += 1
        f = root / str(c) / f"{i:04d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16)).convert("RGB")
        img.save(f)
        files.append(f)
        if all(v >= per_class for v in count.values()):
            break
    return files


def tiny_model(tmp: Path, **overrides):
    """A random tiny ViT (16x16 input, patch 4, dim 32, depth 3) saved to ``tmp/model``: (model, dir)."""
    import vitkit

    torch.manual_seed(0)
    cfg = dict(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=32, depth=3, num_heads=4,
               mlp_dim=64, **overrides)
    model = vitkit.create_model(vitkit.ViTConfig(**cfg))
    # non-trivial preprocessing so the test sees the model's own numbers applied
    model.preprocess_cfg = {"input_size": [3, 16, 16], "mean": [0.2, 0.3, 0.4], "std": [0.5, 0.6, 0.7],
                            "interpolation": "bicubic", "crop_pct": 1.0}
    model.eval()
    path = tmp / "model"
    model.save_pretrained(path)
    return model, path
