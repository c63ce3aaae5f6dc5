"""``embed``: images -> a parquet table of feature vectors, streamed, resumable.

The table has ``path`` (string), ``label`` (string or null) and ``embedding`` (list<float32>);
its schema metadata (key ``vitkit.features``) records how the vectors were made (model source,
pool, layers, normalize, dtype, dim) so ``search`` can embed queries the same way.

Each row also records what it was computed from (``file``, ``size``, ``mtime_ns``, ``blake2b``: a
:class:`vitkit.freshness.Stamp`, null for rows that are not files: ``digits:N`` / ``sample:``
images, rows of in-memory or Hugging Face datasets).

Resuming: finished batches go to ``OUT.parts/part-NNNNN.parquet`` (each written atomically, one
row group) while the run goes on; the end merges the existing ``OUT`` (if any), the parts, row
group by row group (memory bounded), into ``OUT`` atomically and removes ``OUT.parts``. Every row
found there is checked against its file by :func:`vitkit.freshness.check`: unchanged rows are kept,
rows of changed files are embedded again (also files this run does not list), rows of files that
are gone are dropped; the run embeds only what is new or changed. A different model / pool /
layers / normalize / dtype is an error, and so is a table without the stamp columns (written by an
older vitkit: its rows cannot be checked); ``overwrite=True`` starts over. The table itself (schema,
metadata, the resumable writer) is :mod:`vitkit.features.table`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..freshness import CHANGED, FRESH, GONE, Stamp, file_key, stamp
from ..output import claim_output
from ..progress import progress_bar
from .extract import FeatureExtractor, FeatureSpec
from .inputs import Rows, file_source, list_images
from .table import ResumableOutput


@dataclass
class EmbedResult:
    out: Path
    rows: int  # rows in the output file
    new_rows: int  # rows embedded by this call (new images, and changed ones embedded again)
    resumed_rows: int  # images of this call found already embedded and unchanged (earlier or interrupted run)
    dim: int
    changed_rows: int = 0  # of new_rows: files that changed since their earlier row
    gone_rows: int = 0  # earlier rows dropped: their file is gone
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
    from ..model.naflex import naflex_transform

    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    model = extractor.model
    loader = make_loader(dataset, batch_size=batch_size, train=False, workers=workers,
                         device_type=extractor.device.type, with_index=True,
                         preprocess=naflex_transform(model) or model.preprocess_cfg or default_preprocess(model.config))
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


def _stamp_files(paths: list[str], threads: int) -> list[Stamp | OSError]:
    """Stamps taken before the files are read (threads: stat and BLAKE2b release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p: str) -> Stamp | OSError:
        try:
            return stamp(p)
        except OSError as e:
            return e

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(one, paths))


def _select(items_paths: list[str], items_files: list[bool], status: dict[str, str]
            ) -> tuple[list[int], set[str], int]:
    """(todo, listed keys, unchanged count): the items to embed (new, or changed since their row was
    made), each file once however many names it is listed under."""
    todo: list[int] = []
    listed: set[str] = set()
    unchanged = 0
    for i, (p, is_file) in enumerate(zip(items_paths, items_files)):
        key = file_key(p) if is_file else p
        if key in listed:  # the same file under two names
            continue
        listed.add(key)
        if status.get(key) == FRESH:
            unchanged += 1
        else:
            todo.append(i)
    return todo, listed, unchanged


def _stamp_rows(rows: list[tuple], workers: int, skipped: list[tuple[str, str]]) -> tuple[dict[int, Stamp], list[int]]:
    """Stamp the rows' files before they are read: (stamps by row, rows that can be made: not a file,
    or stamped). A file that cannot be stamped goes to ``skipped``."""
    to_stamp = [j for j, r in enumerate(rows) if r[2] is not None]
    stamps: dict[int, Stamp] = {}
    for j, st in zip(to_stamp, _stamp_files([rows[j][2] for j in to_stamp], workers)):
        if isinstance(st, OSError):
            skipped.append((rows[j][0], f"{rows[j][0]}: {st.strerror or st}"))
        else:
            stamps[j] = st
    return stamps, [j for j, r in enumerate(rows) if r[2] is None or j in stamps]


def _rows_dataset(model, make_dataset: Callable, todo: list[int], rows: list[tuple], ok: list[int]):
    """The rows ``ok`` as one dataset (None when there are none): the caller's items through its
    dataset, then the rows of unlisted changed files."""
    n_items = sum(j < len(todo) for j in ok)
    parts = [(make_dataset([todo[j] for j in ok[:n_items]]), list(range(n_items)))] if n_items else []
    if len(ok) > n_items:
        parts.append((file_dataset(model, [rows[j][2] for j in ok[n_items:]]), list(range(len(ok) - n_items))))
    if not parts:
        return None
    return parts[0][0] if len(parts) == 1 else Rows(parts)


def _store_features(sink: ResumableOutput, batches, rows: list[tuple], ok: list[int], stamps: dict[int, Stamp],
                    status: dict[str, str], skipped: list[tuple[str, str]]) -> int:
    """Add the finite vectors of ``batches`` (iter_features over the rows ``ok``) to ``sink``; the
    others, and unreadable images, go to ``skipped``. Returns how many stored rows replace changed ones."""
    changed_rows = 0
    for idx, feats, failures in batches:
        got = [ok[i] for i in idx]
        finite = np.isfinite(feats).all(axis=1)
        for j, f, fine in zip(got, feats, finite):
            if not fine:
                skipped.append((rows[j][0], f"{rows[j][0]}: the model's output for it is not finite "
                                            f"({int((~np.isfinite(f)).sum())} of {f.size} values are NaN "
                                            "or inf); not stored"))
        got = [j for j, fine in zip(got, finite) if fine]
        sink.add([rows[j][0] for j in got], [rows[j][1] for j in got], feats[finite],
                 [stamps.get(j) for j in got])
        changed_rows += sum(status.get(rows[j][3]) == CHANGED for j in got)
        skipped += [(rows[ok[i]][0], msg) for i, msg in failures]
    return changed_rows


def _embed(model, items_paths: list[str], items_labels: list, items_files: list[bool], make_dataset: Callable, out,
           *, spec: FeatureSpec, meta_extra: dict, batch_size: int, workers: int, row_group_size: int,
           overwrite: bool, progress: bool, note: Callable) -> EmbedResult:
    out = Path(out)
    extractor = FeatureExtractor(model, spec)
    from ..data.transforms import default_preprocess
    from ..preprocess import Preprocess

    # + "dim", known at the first batch; "preprocess": what the images go through (--image-size changes it)
    pre = Preprocess.from_dict(model.preprocess_cfg or default_preprocess(model.config)).to_dict()
    meta = {**meta_extra, "preprocess": pre, **spec.to_dict()}
    sink = ResumableOutput(out, meta, overwrite, row_group_size or batch_size, note)
    status = sink.review()
    todo, listed, unchanged = _select(items_paths, items_files, status)
    # rows of files this run does not list are kept to the same rule: embedded again from their file when it changed
    redo = [(sink.found[k][2], sink.found[k][3], k) for k, st in status.items() if st == CHANGED and k not in listed]
    changed = sum(st == CHANGED for st in status.values())
    gone = sum(st == GONE for st in status.values())
    if sink.found:
        note(f"{out}: {unchanged} of {len(listed)} image(s) already embedded and unchanged (earlier or interrupted "
             f"run); {changed} changed since (embedding them again), {gone} gone (dropping their rows), "
             f"{len(todo) - changed + len(redo)} new")
    skipped: list[tuple[str, str]] = []
    # (path, label, file to read, key) of every row to make
    rows = [(items_paths[i], items_labels[i], items_paths[i] if items_files[i] else None,
             file_key(items_paths[i]) if items_files[i] else items_paths[i]) for i in todo]
    rows += [(p, label, file, file) for p, label, file in redo]
    stamps, ok = _stamp_rows(rows, workers, skipped)
    dataset = _rows_dataset(model, make_dataset, todo, rows, ok)
    changed_rows = 0
    try:
        if dataset is not None:
            batches = iter_features(extractor, dataset, batch_size=batch_size, workers=workers, progress=progress)
            changed_rows = _store_features(sink, batches, rows, ok, stamps, status, skipped)
    except BaseException:
        sink.flush()  # finished batches survive an interrupt; the next run skips them
        raise
    if not sink.sources and not sink.buf:
        listed_msgs = "; ".join(msg for _, msg in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        raise InputError(f"no image could be read ({len(skipped)} unreadable: {listed_msgs}); nothing written to {out}")
    total = sink.finish()
    return EmbedResult(out=out, rows=total, new_rows=sink.new_rows, resumed_rows=unchanged, dim=int(sink.dim),
                       changed_rows=changed_rows, gone_rows=gone, skipped=skipped)


def embed_files(model, inputs: list[str], out, *, spec: FeatureSpec | None = None, source: str | None = None,
                batch_size: int = 64, workers: int = 0, row_group_size: int = 1024, overwrite: bool = False,
                progress: bool = True, note: Callable = lambda s: None) -> EmbedResult:
    """Embed image files and folders (recursive) into the parquet file ``out``.

    ``source`` is recorded as the model to embed search queries with (a path or hub id that
    ``vitkit.from_pretrained`` accepts). Unreadable images are skipped and listed in the result."""
    with claim_table(out, inputs):
        paths, labels = list_images([str(i) for i in inputs])
        files = [not p.startswith(("sample:", "digits:")) for p in paths]  # built-ins are not files
        return _embed(model, paths, labels, files, lambda todo: file_dataset(model, [paths[i] for i in todo]), out,
                      spec=spec or FeatureSpec(), meta_extra={"model": source}, batch_size=batch_size,
                      workers=workers, row_group_size=row_group_size, overwrite=overwrite, progress=progress,
                      note=note)


def claim_table(out, inputs=()):
    """Embed's claim on its table (vitkit.output): it appends, so one writer at a time, as train (a
    second fails at once naming the holder, instead of racing it for the parts); never through a
    symlink, never onto or inside an input; a killed run's temporaries are removed."""
    return claim_output(out, command="embed", kind="file", update=True, inputs=inputs,
                        busy_hint="wait for it to finish, or choose another --out")


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
        self.files = hasattr(ds, "paths")  # rows are image files (stamped), not in-memory / Hugging Face rows
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
    with claim_table(out, [data_dir]):
        return _embed_dataset(model, dataset, out, data_dir=data_dir, splits_wanted=splits_wanted, spec=spec,
                              source=source, batch_size=batch_size, workers=workers, row_group_size=row_group_size,
                              overwrite=overwrite, progress=progress, note=note, **dataset_options)


def _embed_dataset(model, dataset: str, out, *, data_dir, splits_wanted, spec, source, batch_size, workers,
                   row_group_size, overwrite, progress, note, **dataset_options) -> EmbedResult:
    splits = load_splits(dataset, data_dir, **dataset_options)
    items = [SplitItems(model, splits, s) for s in splits_wanted if getattr(splits, s, None) is not None]
    # one row per image: a split that doubles as another (imagefolder's test/ as val) is not repeated
    where: list[tuple[int, int]] = []  # (split k, index in that split) per row
    paths, labels, files, seen = [], [], [], set()
    for k, it in enumerate(items):
        for i, (p, lab) in enumerate(zip(it.paths, it.labels)):
            if p not in seen:
                seen.add(p)
                where.append((k, i))
                paths.append(p)
                labels.append(lab)
                files.append(it.files)

    def make(todo: list[int]):
        parts = [(it.ds, [where[j][1] for j in todo if where[j][0] == k]) for k, it in enumerate(items)]
        return Rows([p for p in parts if p[1]])

    return _embed(model, paths, labels, files, make, out, spec=spec or FeatureSpec(),
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
