"""``embed``: images -> a parquet table of feature vectors, streamed, resumable.

The table has ``path`` (string), ``label`` (string or null) and ``embedding`` (list<float32>);
its schema metadata (key ``vitkit.features``) records how the vectors were made (model source,
pool, layers, normalize, dtype, dim) so ``search`` can embed queries the same way.

Resuming: finished batches go to ``OUT.parts/part-NNNNN.parquet`` (each written atomically, one
row group) while the run goes on; the end merges the existing ``OUT`` (if any), the parts, row
group by row group (memory bounded), into ``OUT`` atomically and removes ``OUT.parts``. A run that
was interrupted, or a second run over a folder that gained images, embeds only the paths that
are not in ``OUT`` or its parts yet; a different model / pool / layers / normalize / dtype is an
error (``overwrite=True`` starts over).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..io import atomic_write
from ..progress import progress_bar
from ._deps import require
from .extract import FeatureExtractor, FeatureSpec
from .loader import Rows, file_source, list_images

META_KEY = b"vitkit.features"
# the settings that decide what a vector means: rows made with different ones must not mix
_MUST_MATCH = ("model", "pool", "layers", "normalize", "dtype", "dim")


@dataclass
class EmbedResult:
    out: Path
    rows: int  # rows in the output file
    new_rows: int  # rows embedded by this call
    resumed_rows: int  # rows found already done (earlier run or interrupted parts)
    dim: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) unreadable images


def file_dataset(model, paths: list[str]):
    """Image files for ``model`` (grey for a 1-channel model), read by :func:`iter_features`."""
    return file_source(paths, model.config.in_channels)


def iter_features(extractor: FeatureExtractor, dataset, *, batch_size: int = 64, workers: int = 0,
                  progress: bool = True, desc: str = "embed"):
    """Yield ``(indices (B,) int64 numpy, features (B, F) float32 numpy, failures)`` per batch, in the
    dataset's order; ``failures`` lists ``(index, message)`` of the unreadable images since the last
    batch. Read by vitkit.data's loader through the model's own preprocessing (what predict does)."""
    from ..data.loader import make_loader
    from ..data.transforms import default_preprocess

    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    model = extractor.model
    loader = make_loader(dataset, batch_size=batch_size, train=False, workers=workers,
                         device_type=extractor.device.type, with_index=True,
                         preprocess=model.preprocess_cfg or default_preprocess(model.config))
    # The loader keeps the dataset's order and lists skipped files' messages in that order, so the
    # rows missing between two batches are, in order, the files behind the new messages.
    next_row, told = 0, 0

    def failures_up_to(stop: int, got: set[int]) -> list[tuple[int, str]]:
        nonlocal next_row, told
        missing = [r for r in range(next_row, stop) if r not in got]
        msgs = loader.skipped_files[told:told + len(missing)]
        next_row, told = stop, told + len(missing)
        return list(zip(missing, msgs))

    try:
        with progress_bar(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
            for x, _, idx in loader:
                idx = idx.numpy()
                failures = failures_up_to(int(idx[-1]) + 1, set(idx.tolist()))
                yield idx, extractor(x).cpu().numpy(), failures
                bar.update(len(idx) + len(failures))
            failures = failures_up_to(len(dataset), set())
            if failures:
                yield np.zeros(0, np.int64), np.zeros((0, 0), np.float32), failures
                bar.update(len(failures))
    finally:
        loader.close()


def read_meta(path: str | Path) -> dict:
    """The ``vitkit.features`` metadata of an embeddings parquet file ({} when absent)."""
    pq = require("pyarrow.parquet", "reading embeddings")
    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def _schema(meta: dict):
    pa = require("pyarrow", "writing embeddings")
    return pa.schema([("path", pa.string()), ("label", pa.string()), ("embedding", pa.list_(pa.float32()))],
                     metadata={META_KEY: json.dumps(meta).encode()})


class _ResumableOutput:
    """Parts written as batches finish, merged into ``out`` at the end (see the module docstring)."""

    def __init__(self, out: Path, meta: dict, overwrite: bool, row_group_size: int, note: Callable) -> None:
        self.pa = require("pyarrow", "writing embeddings")
        self.pq = require("pyarrow.parquet", "writing embeddings")
        self.out, self.meta, self.row_group_size, self.note = out, meta, max(1, row_group_size), note
        self.parts_dir = out.with_name(out.name + ".parts")
        self.schema = None  # made at the first batch, when the vectors' width is known
        self.dim: int | None = None
        if overwrite and self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
        self.sources: list[Path] = []  # earlier output + parts, in order
        self.done: set[str] = set()
        self.old_rows = 0
        if out.exists() and not overwrite:
            self._adopt(out)
        self.next_part = 0
        if self.parts_dir.is_dir():
            for part in sorted(self.parts_dir.glob("part-*.parquet")):
                self._adopt(part)
                self.next_part = max(self.next_part, int(part.stem.split("-")[1]) + 1)
        self.buf: list[tuple[list[str], list, np.ndarray]] = []
        self.buffered = 0
        self.new_rows = 0

    def _adopt(self, path: Path) -> None:
        try:
            meta = read_meta(path)
            paths = self.pq.read_table(path, columns=["path"]).column("path").to_pylist()
        except (OSError, self.pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read the earlier embeddings ({e}); delete it or pass --overwrite") from e
        diff = {k: (meta.get(k), self.meta.get(k)) for k in _MUST_MATCH
                if k != "dim" and meta.get(k) != self.meta.get(k)}
        if self.dim is None:
            self.dim = meta.get("dim")
        if diff:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigError(f"{path} holds embeddings made with other settings ({what}); pass --overwrite "
                              "to start over, or choose another --out")
        self.sources.append(path)
        self.done.update(paths)
        self.old_rows += len(paths)

    def add(self, paths: list[str], labels: list, feats: np.ndarray) -> None:
        if not paths:
            return
        self.buf.append((paths, labels, feats))
        self.buffered += len(paths)
        if self.buffered >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        pa = self.pa
        paths = [p for b in self.buf for p in b[0]]
        labels = [v for b in self.buf for v in b[1]]
        feats = np.concatenate([b[2] for b in self.buf]).astype(np.float32, copy=False)
        N, F = feats.shape
        if self.schema is None:
            if self.dim is not None and self.dim != F:
                raise ConfigError(f"{self.sources[0]} holds {self.dim}-d embeddings, this run makes {F}-d ones; "
                                  "pass --overwrite to start over, or choose another --out")
            self.dim = F
            self.schema = _schema({**self.meta, "dim": F})
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (N + 1) * F, F, dtype=np.int32)),
                                       pa.array(feats.reshape(-1)))
        table = pa.Table.from_arrays([pa.array(paths, pa.string()), pa.array(labels, pa.string()), emb],
                                     schema=self.schema)
        part = self.parts_dir / f"part-{self.next_part:05d}.parquet"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(part, lambda tmp: self.pq.write_table(table, tmp))
        self.sources.append(part)
        self.next_part += 1
        self.new_rows += N
        self.buf, self.buffered = [], 0

    def finish(self) -> int:
        """Merge into ``out``; returns its row count."""
        self.flush()
        if self.schema is None:  # nothing new: keep the earlier rows' own schema
            self.schema = self.pq.read_schema(self.sources[0])
        if self.sources != [self.out]:
            def write(tmp):
                with self.pq.ParquetWriter(tmp, self.schema) as w:
                    for src in self.sources:
                        pf = self.pq.ParquetFile(src)
                        for g in range(pf.num_row_groups):
                            w.write_table(pf.read_row_group(g).replace_schema_metadata(self.schema.metadata))
            atomic_write(self.out, write)
        if self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
        return self.pq.ParquetFile(self.out).metadata.num_rows


def _embed(model, items_paths: list[str], items_labels: list, make_dataset: Callable, out, *, spec: FeatureSpec,
           meta_extra: dict, batch_size: int, workers: int, row_group_size: int, overwrite: bool,
           progress: bool, note: Callable) -> EmbedResult:
    out = Path(out)
    extractor = FeatureExtractor(model, spec)
    meta = {**meta_extra, **spec.to_dict()}  # + "dim", known at the first batch
    sink = _ResumableOutput(out, meta, overwrite, row_group_size or batch_size, note)
    todo = [i for i, p in enumerate(items_paths) if p not in sink.done]
    if sink.done:
        note(f"{out}: {len(items_paths) - len(todo)} of {len(items_paths)} image(s) already embedded "
             f"(earlier or interrupted run); embedding the other {len(todo)}")
    skipped: list[tuple[str, str]] = []
    try:
        if todo:
            for idx, feats, failures in iter_features(extractor, make_dataset(todo), batch_size=batch_size,
                                                      workers=workers, progress=progress):
                rows = [todo[i] for i in idx]
                sink.add([items_paths[r] for r in rows], [items_labels[r] for r in rows], feats)
                skipped += [(items_paths[todo[i]], msg) for i, msg in failures]
    except BaseException:
        sink.flush()  # finished batches survive an interrupt; the next run skips them
        raise
    if not sink.sources and not sink.buf:
        listed = "; ".join(msg for _, msg in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        raise InputError(f"no image could be read ({len(skipped)} unreadable: {listed}); nothing written to {out}")
    rows = sink.finish()
    return EmbedResult(out=out, rows=rows, new_rows=sink.new_rows, resumed_rows=len(items_paths) - len(todo),
                       dim=int(sink.dim), skipped=skipped)


def embed_files(model, inputs: list[str], out, *, spec: FeatureSpec | None = None, source: str | None = None,
                batch_size: int = 64, workers: int = 0, row_group_size: int = 1024, overwrite: bool = False,
                progress: bool = True, note: Callable = lambda s: None) -> EmbedResult:
    """Embed image files and folders (recursive) into the parquet file ``out``.

    ``source`` is recorded as the model to embed search queries with (a path or hub id that
    ``vitkit.from_pretrained`` accepts). Unreadable images are skipped and listed in the result."""
    paths, labels = list_images([str(i) for i in inputs])
    return _embed(model, paths, labels, lambda todo: file_dataset(model, [paths[i] for i in todo]), out,
                  spec=spec or FeatureSpec(), meta_extra={"model": source}, batch_size=batch_size,
                  workers=workers, row_group_size=row_group_size, overwrite=overwrite, progress=progress,
                  note=note)


# ---------------------------------------------------------------------------------- datasets
def load_splits(dataset: str, data_dir: str | None = None, **options):
    """The splits of a registered dataset (``vitkit.data`` registry: the same names and options as
    ``vitkit train``), at their native size: the feature code applies the model's preprocessing."""
    from ..data import DataSpec, build_data

    # Unreadable files are skipped and listed by the feature loader, so no up-front header pass.
    spec = DataSpec(dataset=dataset, data_dir=data_dir, image_size=0, skip_bad_images=True, check_files=False,
                    **options)
    return build_data(spec)


class SplitItems:
    """One split as (path, label) items plus a dataset factory over any subset of them."""

    def __init__(self, model, splits, split: str) -> None:
        ds = getattr(splits, split)
        if ds is None:
            raise InputError(f"{splits.name} has no {split} split")
        self.ds = ds
        self.targets = torch.as_tensor(ds.targets)
        classes = splits.classes if splits.task == "classification" else None
        self.labels = [classes[int(t)] for t in self.targets] if classes else [None] * len(ds)
        if hasattr(ds, "read") and not hasattr(ds, "stream"):  # files, in-memory tensors, Hugging Face rows
            # file paths as they are; the other kinds' rows are named <dataset>/<split>/<index>
            self.paths = ([str(p) for p in ds.paths] if hasattr(ds, "paths")
                          else [f"{splits.name}/{split}/{i}" for i in range(len(ds))])
            self.make = lambda todo: Rows([(ds, todo)])
        else:
            raise InputError(f"{splits.name}: its {split} split cannot be read image by image (streamed shards); "
                             "embed its image files, or convert it to an imagefolder")


def embed_dataset(model, dataset: str, out, *, data_dir: str | None = None, splits_wanted=("train", "val", "test"),
                  spec: FeatureSpec | None = None, source: str | None = None, batch_size: int = 64,
                  workers: int = 0, row_group_size: int = 1024, overwrite: bool = False, progress: bool = True,
                  note: Callable = lambda s: None, **dataset_options) -> EmbedResult:
    """Embed every image of a training dataset's splits (paths of in-memory datasets read
    ``<name>/<split>/<index>``), labels = class names."""
    splits = load_splits(dataset, data_dir, **dataset_options)
    items = [SplitItems(model, splits, s) for s in splits_wanted if getattr(splits, s, None) is not None]
    # one row per image: a split that doubles as another (imagefolder's test/ as val) is not repeated
    where: list[tuple[int, int]] = []  # (split k, index in that split) per row
    paths, labels, seen = [], [], set()
    for k, it in enumerate(items):
        for i, (p, lab) in enumerate(zip(it.paths, it.labels)):
            if p not in seen:
                seen.add(p)
                where.append((k, i))
                paths.append(p)
                labels.append(lab)

    def make(todo: list[int]):
        parts = [(it.ds, [where[j][1] for j in todo if where[j][0] == k]) for k, it in enumerate(items)]
        return Rows([p for p in parts if p[1]])

    return _embed(model, paths, labels, make, out, spec=spec or FeatureSpec(),
                  meta_extra={"model": source, "dataset": dataset}, batch_size=batch_size, workers=workers,
                  row_group_size=row_group_size, overwrite=overwrite, progress=progress, note=note)


def split_features(model, splits, split: str, *, spec: FeatureSpec, batch_size: int = 64, workers: int = 0,
                   progress: bool = True, extractor: FeatureExtractor | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(features (N, F), targets (N,), skipped) of one split, in memory (k-NN / linear probe)."""
    items = SplitItems(model, splits, split)
    extractor = extractor or FeatureExtractor(model, spec)
    feats, idx_all, skipped = [], [], []
    for idx, f, failures in iter_features(extractor, items.make(list(range(len(items.paths)))),
                                          batch_size=batch_size, workers=workers, progress=progress,
                                          desc=f"features {split}"):
        if len(idx):
            feats.append(f)
            idx_all.append(idx)
        skipped += [(items.paths[i], msg) for i, msg in failures]
    if not feats:
        raise InputError(f"{splits.name} {split}: no image could be read")
    idx = np.concatenate(idx_all)
    return np.concatenate(feats), items.targets.numpy()[idx], skipped


def labelled_features(model, dataset: str, *, data_dir: str | None = None, want=("train", "val", "test"),
                      spec: FeatureSpec | None = None, batch_size: int = 64, workers: int = 0,
                      progress: bool = True, **dataset_options) -> tuple[dict, object]:
    """Features and class indices of a labelled dataset's splits, for k-NN and the linear probe:
    ({split: (X, y, skipped)}, splits). Splits the dataset lacks are absent from the dict."""
    splits = load_splits(dataset, data_dir, **dataset_options)
    if splits.task != "classification" or not splits.classes:
        raise InputError(f"{dataset} has no class labels (task: {splits.task}); k-NN and the linear probe "
                         "need a labelled classification dataset (class folders, digits, cifar10, ...)")
    spec = spec or FeatureSpec()
    extractor = FeatureExtractor(model, spec)  # one for every split
    out = {s: split_features(model, splits, s, spec=spec, batch_size=batch_size, workers=workers,
                             progress=progress, extractor=extractor)
           for s in want if getattr(splits, s, None) is not None}
    return out, splits


def write_embeddings(out, paths: list[str], labels: list, vectors, meta: dict | None = None,
                     row_group_size: int = 65536) -> Path:
    """Write vectors you computed elsewhere as an embeddings table (same schema as ``embed``),
    atomically. ``vectors``: (N, D) float32 array, or an iterable of (B, D) blocks in row order."""
    pa = require("pyarrow", "writing embeddings")
    pq = require("pyarrow.parquet", "writing embeddings")
    blocks = [np.asarray(vectors)] if hasattr(vectors, "shape") else vectors
    out = Path(out)

    def write(tmp):
        at, schema = 0, None
        writer = None
        try:
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=np.float32)
                for s in range(0, len(block), row_group_size):
                    part = block[s:s + row_group_size]
                    N, F = part.shape
                    if schema is None:
                        schema = _schema({"model": None, **(meta or {}), "dim": F})
                        writer = pq.ParquetWriter(tmp, schema)
                    emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (N + 1) * F, F, dtype=np.int64)
                                                            .astype(np.int32)), pa.array(part.reshape(-1)))
                    writer.write_table(pa.Table.from_arrays(
                        [pa.array(paths[at:at + N], pa.string()), pa.array(labels[at:at + N], pa.string()), emb],
                        schema=schema))
                    at += N
        finally:
            if writer is not None:
                writer.close()
        if at != len(paths):
            raise InputError(f"{len(paths)} paths but {at} vectors")

    return atomic_write(out, write)
