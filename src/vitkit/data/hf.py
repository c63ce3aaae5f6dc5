"""Hugging Face datasets: ``--dataset hf --data-dir PATH``.

PATH is a dataset saved with ``save_to_disk`` (a ``DatasetDict`` with ``train`` / ``validation`` /
``test``, or one ``Dataset``), or a folder of parquet files (``train-*.parquet``,
``validation-*.parquet``, ``test-*.parquet``, or sub-folders ``train/`` ... holding them, as on the
Hub). Columns ``image`` and ``label`` by default (``--image-column`` / ``--label-column``); the image
column holds encoded images (an ``Image`` feature, or raw bytes), decoded in the loader's workers;
a ``ClassLabel`` label column gives the class names. Missing columns, a val / test label that the
training split never uses, or no ``train`` split are errors before training starts. Without a
validation split, one is held out from train (stratified, seeded); without a test split the
validation split serves as both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from .deps import require

SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


class HFImageDataset(Dataset):
    """One split of a ``datasets.Dataset``; ``read(i)`` decodes row i's image (in a worker)."""

    in_memory = False

    def __init__(self, ds, image_column: str, label_column: str, image_hw, split: str, targets=None):
        self.ds, self.image_column, self.label_column, self.split = ds, image_column, label_column, split
        self.image_hw = tuple(image_hw)
        self.targets = targets if targets is not None else torch.tensor(list(ds[label_column]), dtype=torch.long)
        self.skip_bad = False

    def __len__(self) -> int:
        return len(self.ds)

    def image_bytes(self, i: int) -> tuple[bytes, str]:
        v = self.ds[int(i)][self.image_column]
        name = f"{self.split} row {int(i)}"
        if isinstance(v, dict):
            if v.get("bytes"):
                return v["bytes"], (v.get("path") or name)
            if v.get("path"):
                from .files import read_bytes

                return read_bytes(v["path"]), v["path"]
        if isinstance(v, (bytes, bytearray)):
            return bytes(v), name
        raise InputError(f"hf: {name}: column {self.image_column!r} holds {type(v).__name__}, expected an encoded "
                         "image (an Image feature or bytes)")

    def read(self, i: int):
        from .files import decode_bytes

        data, name = self.image_bytes(i)
        try:
            x = decode_bytes(data, name)
        except InputError as e:
            raise InputError(f"{e} (hf {self.split} split, row {int(i)})") from None
        return x, self.targets[int(i)]

    def subset(self, idx) -> HFImageDataset:
        idx = [int(i) for i in idx]
        return HFImageDataset(self.ds.select(idx), self.image_column, self.label_column, self.image_hw, self.split,
                              self.targets[torch.as_tensor(idx, dtype=torch.long)])


def _load(path: Path) -> dict:
    """{"train": Dataset, "val": ..., "test": ...} from save_to_disk output or parquet files."""
    datasets = require("datasets", "--dataset hf")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        obj = datasets.load_from_disk(str(path))
        if isinstance(obj, datasets.DatasetDict):
            out = {}
            for k, v in obj.items():
                if k in SPLIT_NAMES:
                    out[SPLIT_NAMES[k]] = v
            if "train" not in out:
                raise InputError(f"hf: {path} holds splits {list(obj)}; expected 'train' (+ 'validation' / 'test')")
            return out
        return {"train": obj}
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise InputError(f"hf: {path} is neither a dataset saved with save_to_disk (dataset_dict.json) nor a folder "
                         "of .parquet files")
    groups: dict[str, list[Path]] = {}
    for f in files:
        rel = f.relative_to(path)
        split = next((SPLIT_NAMES[p] for p in rel.parts[:-1] if p in SPLIT_NAMES), None)
        if split is None:
            stem = f.name.split("-")[0].split(".")[0].split("_")[0]
            split = SPLIT_NAMES.get(stem)
        if split is None:
            raise InputError(f"hf: cannot tell the split of {f}: name parquet files train-*.parquet, "
                             "validation-*.parquet, test-*.parquet (or put them in train/, validation/, test/)")
        groups.setdefault(split, []).append(f)
    if "train" not in groups:
        raise InputError(f"hf: no train parquet files under {path} (found splits {sorted(groups)})")
    pq = require("pyarrow.parquet", "--dataset hf (parquet)")
    pa = require("pyarrow", "--dataset hf (parquet)")
    # datasets.Dataset over the memory-mapped table keeps the features (ClassLabel names) stored in the
    # parquet schema metadata, without writing a cache copy.
    return {s: datasets.Dataset(pa.concat_tables([pq.read_table(f, memory_map=True) for f in fs]))
            for s, fs in groups.items()}


def build_hf(spec):
    from .datasets import DataSplits, _need_dir, resolve_hw, stratified_split
    from .files import image_header

    datasets = require("datasets", "--dataset hf")
    path = _need_dir(spec)
    if not path.exists():
        raise InputError(f"hf: {path}: no such folder")
    raw = _load(path)
    img_col, lab_col = spec.image_column, spec.label_column
    for s, ds in raw.items():
        missing = [c for c in (img_col, lab_col) if c not in ds.column_names]
        if missing:
            raise InputError(f"hf: the {s} split has no column(s) {missing}; its columns are {ds.column_names}. "
                             "Name them with --image-column / --label-column")
    feat = raw["train"].features
    label_feat = feat[lab_col]
    notes = []
    splits = {}
    for s, ds in raw.items():
        ds = ds.select_columns([img_col, lab_col])
        if isinstance(ds.features[img_col], datasets.Image):
            ds = ds.cast_column(img_col, datasets.Image(decode=False))  # bytes to the workers, decoded there
        splits[s] = ds
    labels = {s: np.asarray(list(ds[lab_col])) for s, ds in splits.items()}
    for s, y in labels.items():
        if y.dtype.kind not in "iu":
            raise InputError(f"hf: label column {lab_col!r} of the {s} split holds {y.dtype} values; expected "
                             "integer class ids (a ClassLabel)")
    train_set = set(labels["train"].tolist())
    if isinstance(label_feat, datasets.ClassLabel):
        classes = list(label_feat.names)
    else:
        classes = [str(i) for i in range(int(labels["train"].max()) + 1)]
    for s in ("val", "test"):
        if s in labels:
            extra = sorted(set(labels[s].tolist()) - train_set)
            if extra:
                raise InputError(f"hf: the {s} split uses label(s) {extra[:10]} that no training row has")
    if "val" not in splits:
        va, tr = stratified_split(labels["train"], [spec.val_fraction], spec.seed)
        full = splits["train"]
        splits["train"], splits["val"] = full.select(tr.tolist()), full.select(va.tolist())
        labels["train"], labels["val"] = labels["train"][tr], labels["train"][va]
        notes.append(f"hf: no validation split; {spec.val_fraction:.0%} of train held out (stratified)")
    if "test" not in splits:
        splits["test"], labels["test"] = splits["val"], labels["val"]
        notes.append("hf: no test split; the validation split serves as both")
    # image size from a sample of the training images' headers
    probe_ds = HFImageDataset(splits["train"], img_col, lab_col, (1, 1), "train",
                              torch.as_tensor(labels["train"]))
    sizes = []
    n = len(probe_ds)
    for i in range(0, n, max(1, n // 32)):
        try:
            data, name = probe_ds.image_bytes(i)
            sizes.append(image_header(data, name)[1][::-1])
        except InputError:
            continue
        if len(sizes) >= 32:
            break
    hw, size_note, from_data = resolve_hw(spec, sizes=sizes)
    mk = lambda s: HFImageDataset(splits[s], img_col, lab_col, hw, s, torch.as_tensor(labels[s], dtype=torch.long))  # noqa: E731
    return DataSplits(name="hf", train=mk("train"), val=mk("val"), test=mk("test"), task="classification",
                      num_outputs=len(classes), in_channels=3, image_hw=hw, classes=classes, mean=[0.5] * 3,
                      std=[0.5] * 3, hflip_ok=True, notes=notes, size_note=size_note, size_from_data=from_data)
