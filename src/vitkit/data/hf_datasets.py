"""Hugging Face datasets: ``--dataset hf --data-dir PATH``.

PATH is a dataset saved with ``save_to_disk`` (a ``DatasetDict`` with ``train`` / ``validation`` /
``test``, or one ``Dataset``), or a folder of parquet files (``train-*.parquet``,
``validation-*.parquet``, ``test-*.parquet``, or sub-folders ``train/`` ... holding them, as on the
Hub). Columns ``image`` and ``label`` by default (``--image-column`` / ``--label-column``); the image
column holds encoded images (an ``Image`` feature, or raw bytes), decoded in the loader's workers;
a ``ClassLabel`` label column gives the class names; a column of text labels ("cat", "digit0") is read
as class names (the sorted names of the train split, the same indices for every split). Missing columns, a val / test label that the
training split never uses, or no ``train`` split are errors before training starts. A val / test
split whose ``ClassLabel`` lists the names in another order is matched to train's by name
(:mod:`vitkit.data.labels`). Without a validation split, one is held out from train
(:mod:`vitkit.data.validation`); without a test split the final numbers are on the validation
split, and named so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..deps import require
from ..errors import InputError

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
    datasets = require("datasets", "--dataset hf", "data")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        pa = require("pyarrow", "--dataset hf", "data")
        try:
            obj = datasets.load_from_disk(str(path))
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"hf: {path}: cannot read the saved dataset ({_first_line(e)}); a truncated or "
                             "partly copied folder? Save or copy it again") from None
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
    pq = require("pyarrow.parquet", "--dataset hf (parquet)", "data")
    pa = require("pyarrow", "--dataset hf (parquet)", "data")
    # datasets.Dataset over the memory-mapped table keeps the features (ClassLabel names) stored in the
    # parquet schema metadata, without writing a cache copy.
    return {s: datasets.Dataset(pa.concat_tables([_read_parquet(pq, pa, f) for f in fs]))
            for s, fs in groups.items()}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_parquet(pq, pa, f: Path):
    try:
        return pq.read_table(f, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"hf: {f}: not a readable parquet file ({_first_line(e)}); a truncated copy or "
                         "download? Copy or write it again") from None


_NONE = object()


def _label_ids(values: dict[str, list], column: str) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """({split: int64 class ids}, class names or None) from each split's label values: integer ids
    as they are; text labels are class names, numbered in the sorted order of the train split's."""
    named = any(isinstance(v, str) for vs in values.values() for v in vs)
    for s, vs in values.items():
        bad = next((v for v in vs if not (isinstance(v, str) if named else
                                          isinstance(v, (int, np.integer)) and not isinstance(v, bool))), _NONE)
        if bad is not _NONE:
            what = ("empty (None)" if bad is None else "decimal numbers" if isinstance(bad, float) else
                    "both class names and other values" if named else type(bad).__name__ + " values")
            raise InputError(f"hf: label column {column!r} of the {s} split holds {what} (e.g. {bad!r}); expected "
                             "integer class ids or class names (text) in every row")
    if not named:
        return {s: np.asarray(vs, dtype=np.int64) for s, vs in values.items()}, None
    classes = sorted(set(values["train"]))
    pos = {name: i for i, name in enumerate(classes)}
    for s, vs in values.items():
        unknown = sorted(set(vs) - pos.keys())
        if unknown:
            raise InputError(f"hf: the {s} split uses class name(s) {unknown[:10]} that no training row has")
    return {s: np.asarray([pos[v] for v in vs], dtype=np.int64) for s, vs in values.items()}, classes


def build_hf(spec):
    from .datasets import DataSplits, need_dir, resolve_hw
    from .validation import HELD_OUT, holdout_indices, holdout_note

    datasets = require("datasets", "--dataset hf", "data")
    path = need_dir(spec)
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
    labels, classes = _label_ids({s: list(ds[lab_col]) for s, ds in splits.items()}, lab_col)
    if classes is not None:
        notes.append(f"hf: label column {lab_col!r} holds class names: {len(classes)} classes, numbered in sorted "
                     "order")
    if isinstance(label_feat, datasets.ClassLabel):
        classes = list(label_feat.names)
        _match_class_labels(splits, labels, classes, lab_col, path, notes, datasets.ClassLabel)
    elif classes is None:
        classes = [str(i) for i in range(int(labels["train"].max()) + 1)]
    train_set = set(labels["train"].tolist())
    for s in ("val", "test"):
        if s in labels:
            extra = sorted(set(labels[s].tolist()) - train_set)
            if extra:
                raise InputError(f"hf: the {s} split uses label(s) {extra[:10]} that no training row has")
    val_name = "val"
    if "val" not in splits:
        n = len(labels["train"])
        tr, va = holdout_indices(labels["train"], spec.val_fraction, spec.seed, f"hf {path}")
        full = splits["train"]
        splits["train"], splits["val"] = full.select(tr.tolist()), full.select(va.tolist())
        labels["train"], labels["val"] = labels["train"][tr], labels["train"][va]
        notes.append(holdout_note(f"hf {path}", spec.val_fraction, spec.seed, len(va), n))
        val_name = HELD_OUT
    sizes = _probe_sizes(HFImageDataset(splits["train"], img_col, lab_col, (1, 1), "train",
                                        torch.as_tensor(labels["train"])))
    hw, size_note, from_data = resolve_hw(spec, sizes=sizes)
    mk = lambda s: HFImageDataset(splits[s], img_col, lab_col, hw, s, torch.as_tensor(labels[s], dtype=torch.long))  # noqa: E731
    return DataSplits(name="hf", train=mk("train"), val=mk("val"), test=mk("test") if "test" in splits else None,
                      val_name=val_name, task="classification",
                      num_outputs=len(classes), in_channels=3, image_hw=hw, classes=classes, mean=[0.5] * 3,
                      std=[0.5] * 3, hflip_ok=True, notes=notes, size_note=size_note, size_from_data=from_data)


def _match_class_labels(splits, labels, classes: list[str], lab_col: str, path, notes: list[str], class_label) -> None:
    """A ``ClassLabel`` train split: its names must be unique; a val / test split listing the same
    names in another order has its label ids rewritten (in ``labels``) to train's, by name."""
    from .labels import check_unique, match_labels

    check_unique(classes, f"hf {path}: the train split's {lab_col!r} names")
    for s in ("val", "test"):
        names = splits[s].features[lab_col].names if s in splits and isinstance(
            splits[s].features[lab_col], class_label) else classes
        if list(names) == classes:
            continue
        try:
            idx = np.asarray(match_labels(classes, names, what="the train split", map_option=False).index)
        except InputError as e:
            raise InputError(f"hf {path}: the {s} split's class names: {e}") from None
        y = labels[s].copy()
        ok = (y >= 0) & (y < len(idx))
        y[ok] = idx[y[ok]]
        labels[s] = y
        notes.append(f"hf: the {s} split's class names are in another order; matched to train's by name")


def _probe_sizes(train: HFImageDataset, limit: int = 32) -> list[tuple[int, int]]:
    """(H, W) of up to ``limit`` training images spread over the split, read from their headers."""
    from .files import image_header

    sizes = []
    n = len(train)
    for i in range(0, n, max(1, n // limit)):
        try:
            data, name = train.image_bytes(i)
            sizes.append(image_header(data, name)[1][::-1])
        except InputError:
            continue
        if len(sizes) >= limit:
            break
    return sizes
