"""WebDataset tar shards: ``DIR/train-*.tar``, ``DIR/val-*.tar``, ``DIR/test-*.tar``, or the same
splits one level down, ``DIR/train/*.tar``, ``DIR/val/*.tar`` (or ``validation/``), ``DIR/test/*.tar``.

Each sample is an image (``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp``) and its label (``.cls``: an
integer class id, or a class name, as text), grouped by key as the ``webdataset`` library does (the
key is the file name up to its first dot). Class names come from ``classes.txt`` (one per line) or
``classes.json`` (a list, or {index: name}) beside the shards, else the label values themselves
("0", "1", ...). Names in ``.cls`` ("cat", "digit0") are classes too: listed in ``classes.txt`` /
``classes.json`` when there is one, else the sorted names of the training shards, the same indices
for every split.

Before training, every shard's member list and labels are read (``tarfile``: headers and the small
``.cls`` members only): a truncated shard, a sample without a label or an image, or a val / test
label the training shards never use is an error naming the shard and the sample key.

Streaming, epoch ``e``: the shard order is shuffled with (seed, e), the samples go through
webdataset's shuffle buffer seeded with (seed, e); that one global stream is cut into global
batches (the last partial one dropped when training) and rank r of N takes its slice of each, so
the ranks and workers together see every sample at most once per epoch and every rank gets the same
number of equal batches. Each worker reads the (whole) stream of tar bytes and decodes only the
samples of its own batches (batch b goes to worker b mod W, the order in which the DataLoader
collects them), so the batches are identical for any ``--workers``. Reading every shard in every
worker costs I/O (tar bytes are cheap next to JPEG decoding on a local disk); with many remote
shards, pre-split them instead.

The stream's workers are not persistent: they start again each epoch (they learn the epoch and
the resume position from the pickled dataset), which costs a second or so per epoch.

Resume mid-epoch is EXACT: the loader's state holds (epoch, batches yielded); a resumed loader
replays the same stream and skips the batches already trained on without decoding them.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from ..deps import require
from ..errors import InputError

log = logging.getLogger("vitkit.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Split folders (DIR/train/*.tar ...) beside the DIR/train-*.tar prefixes; names as in vitkit.data.hf_datasets
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
SHUFFLE_BUFFER = 1000


def _key_ext(name: str) -> tuple[str, str] | None:
    """webdataset's grouping rule: key = path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def read_label(raw: bytes, where: str) -> int | str:
    """A .cls value: an integer class id, else a class name (the text)."""
    try:
        text = bytes(raw).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{where}: .cls must hold an integer class id or a class name (UTF-8 text), got "
                         f"{bytes(raw)[:40]!r}") from None
    if not text:
        raise InputError(f"{where}: empty .cls; it must hold an integer class id or a class name")
    try:
        return int(text)
    except ValueError:
        return text


def _sample_files(cur: str, members: list[str]) -> str:
    """The member names of a sample, a few of them, and webdataset's key rule where a dot in the
    key (``img.v2.00001.jpg``) is what went wrong."""
    shown = ", ".join(members[:4]) + (f" and {len(members) - 4} more" if len(members) > 4 else "")
    dotted = next((m for m in members if "." in m.rpartition("/")[2].split(".", 1)[1]), None)
    if dotted is None:
        return f"files: {shown}"
    ext = dotted.rpartition("/")[2].split(".", 1)[1]
    return (f"files: {shown}. webdataset's rule: a sample's key is the file name up to its FIRST dot and the "
            f"rest is the extension, so {dotted!r} is sample {cur!r} with extension {ext!r}; rename the files "
            "so that the only dot is the extension's (e.g. img_v2_00001.jpg + img_v2_00001.cls)")


def index_shard(path: Path, probe: list | None = None, probe_k: int = 0):
    """[(key, label)] of one shard (label: an integer class id or a class name), checking every sample
    has an image and a .cls, and that the tar file is whole (ends with tar's end-of-archive block)."""
    out = []
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        # "r:*" lists each compression it tried, one per line: the plain tar reader's line says most
        lines = str(e).splitlines() or [type(e).__name__]
        why = next((ln.strip("- ") for ln in lines if "method tar" in ln), lines[0])
        raise InputError(f"webdataset: {path}: not a readable tar file, truncated or corrupt ({why}); copy or "
                         "write the shard again") from None
    with tf:
        cur, files, members, label, last = None, set(), [], None, None

        def close():
            if cur is None:
                return
            if label is None:
                raise InputError(f"webdataset: {path}: sample {cur!r} has no .cls label ({_sample_files(cur, members)}); "
                                 "every sample needs KEY.cls holding its class id or name")
            if not files & set(IMAGE_EXTS):
                raise InputError(f"webdataset: {path}: sample {cur!r} has no image ({', '.join(IMAGE_EXTS)}); "
                                 f"{_sample_files(cur, members)}")
            out.append((cur, label))

        try:
            for m in tf:
                last = m.name
                if not m.isfile():
                    continue
                ke = _key_ext(m.name)
                if ke is None:
                    continue
                key, ext = ke
                if key != cur:
                    close()
                    cur, files, members, label = key, set(), [], None
                files.add(ext)
                members.append(m.name)
                if ext == "cls":
                    label = read_label(tf.extractfile(m).read(), f"webdataset: {path}: sample {key!r}")
                elif ext in IMAGE_EXTS and probe is not None and len(probe) < probe_k:
                    probe.append((f"{path}:{m.name}", tf.extractfile(m).read()))
            # Python's tarfile takes a file that simply stops (a copy or download cut short) for the end of
            # the archive; a whole tar file has a block of zeros where its member list ends.
            tf.fileobj.seek(tf.offset)
            end = tf.fileobj.read(tarfile.BLOCKSIZE)
            whole = len(end) == tarfile.BLOCKSIZE and not end.strip(b"\0")
            why = None if whole else "it ends without tar's end-of-archive block"
        except (tarfile.TarError, OSError, EOFError) as e:
            why = str(e).splitlines()[0]
        if why is not None:
            where = f"; the last member read: {last!r}" if last else ""
            raise InputError(f"webdataset: {path}: truncated or corrupt tar file ({why}{where}); copy or write "
                             "the shard again")
        close()
    return out


def _class_file(root: Path) -> tuple[list[str], Path] | None:
    """(names, file) from classes.txt / classes.json beside the shards, or None."""
    txt, js = root / "classes.txt", root / "classes.json"
    if txt.is_file():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()], txt
    if js.is_file():
        data = json.loads(js.read_text())
        return ([str(v) for v in data] if isinstance(data, list) else
                [str(data[k]) for k in sorted(data, key=lambda k: int(k))]), js
    return None


def _class_names(root: Path, labels: set[int]) -> list[str]:
    found = _class_file(root)
    if found is None:
        return [str(i) for i in range(max(labels) + 1)]
    names, src = found
    if labels and max(labels) >= len(names):
        raise InputError(f"webdataset: {src} names {len(names)} classes but the shards use label {max(labels)}")
    from .labels import check_unique

    check_unique(names, f"webdataset: {src}")  # classes are matched to a model's labels by name
    return names


def _named_classes(root: Path, index: dict) -> tuple[list[str], dict[str, int]]:
    """(classes, name -> index) for .cls labels that are class names: the names of classes.txt /
    classes.json when there is one (each used name must be listed), else the sorted names of the
    training shards; a val / test name that neither lists is an error."""
    found = _class_file(root)
    classes = found[0] if found else sorted({str(lab) for _, lab in index["train"]})
    if found:
        from .labels import check_unique

        check_unique(classes, f"webdataset: {found[1]}")
    pos = {name: i for i, name in enumerate(classes)}
    for s, kl in index.items():
        unknown = sorted({str(lab) for _, lab in kl} - pos.keys())
        if unknown:
            where = f"listed in {found[1]}" if found else "used by the training shards"
            raise InputError(f"webdataset: the {s} shards use class name(s) {unknown[:10]} not {where} "
                             f"({len(classes)} classes: {classes[:10]}{' ...' if len(classes) > 10 else ''})")
    return classes, pos


class ShardDataset(Dataset):
    """One split's shards, indexed (sample count, labels); ``stream(...)`` gives the per-epoch
    IterableDataset the loader iterates (a Dataset only as a marker: no random access)."""

    in_memory = False

    def __init__(self, shards: list[Path], labels: list[int], image_hw, split: str,
                 class_index: dict[str, int] | None = None):
        self.shards, self.split = [str(s) for s in shards], split
        self.class_index = class_index  # .cls names -> class indices; None: .cls holds the indices
        self.targets = torch.tensor(labels, dtype=torch.long)
        self.image_hw = tuple(image_hw)
        self.limit = len(labels)
        self.skip_bad = False

    def __len__(self) -> int:
        return self.limit

    def subset(self, idx) -> ShardDataset:
        """The first len(idx) samples of each epoch's stream (``--subset``)."""
        out = ShardDataset([Path(s) for s in self.shards], self.targets.tolist(), self.image_hw, self.split,
                           self.class_index)
        out.limit = min(len(list(idx)), self.limit)
        return out

    def stream(self, **kw) -> ShardStream:
        return ShardStream(self, **kw)


class ShardStream(IterableDataset):
    def __init__(self, ds: ShardDataset, *, batch_size: int, train: bool, seed: int, rank: int, world_size: int,
                 drop_last: bool, transform, skip_bad: bool):
        self.shards, self.n, self.split, self.class_index = ds.shards, ds.limit, ds.split, ds.class_index
        self.B, self.train, self.seed, self.rank, self.world = batch_size, train, seed, rank, world_size
        self.drop_last, self.transform, self.skip_bad = drop_last, transform, skip_bad
        self.epoch = 0
        self.start_batch = 0  # set by the loader on resume: batches of this epoch already yielded

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _n_global(self) -> int:
        return self.n // self.B if self.drop_last else -(-self.n // self.B)

    def _local(self, gsize: int) -> tuple[int, int]:
        per, extra = divmod(gsize, self.world)
        lo = self.rank * per + min(self.rank, extra)
        return lo, lo + per + (1 if self.rank < extra else 0)

    def __len__(self) -> int:
        n = 0
        for g in range(self._n_global()):
            lo, hi = self._local(min(self.B, self.n - g * self.B))
            n += hi > lo
        return n

    def _samples(self):
        from .loader import sample_seed

        wds = require("webdataset", "--dataset webdataset", "data")
        urls = list(self.shards)
        if self.train:
            random.Random(sample_seed(self.seed, self.epoch, -3)).shuffle(urls)
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        if self.train:
            ds = ds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, seed=sample_seed(self.seed, self.epoch, -2))
        return iter(ds)

    def _decode(self, p: int, sample: dict):
        from .files import decode_bytes
        from .loader import _Bad, sample_seed

        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        name = f"{sample.get('__url__', '?')}:{sample['__key__']}"
        try:
            if ext is None or "cls" not in sample:
                raise InputError(f"{name}: sample without {'an image' if ext is None else 'a .cls label'}")
            x = decode_bytes(sample[ext], f"{name}.{ext}")
            y = read_label(sample["cls"], name)
            if self.class_index is not None:
                y = self.class_index[str(y)]
        except (InputError, ValueError, KeyError) as e:
            return _Bad(f"{e} ({self.split} shard sample)", name)
        s = sample_seed(self.seed, self.epoch, p)
        torch.default_generator.manual_seed(s)
        return self.transform.sample(x), torch.tensor(y), s, p

    def __iter__(self):
        from .loader import collate, single_threaded_ops

        info = torch.utils.data.get_worker_info()
        wid, W = (info.id, info.num_workers) if info is not None else (0, 1)
        n_global, B = self._n_global(), self.B
        raw, local_b = [], -1
        for p, sample in enumerate(self._samples()):
            g = p // B
            if g >= n_global or p >= self.n:
                break
            lo, hi = self._local(min(B, self.n - g * B))
            within = p - g * B
            if within == lo:
                local_b += 1  # batches numbered as the loader yields them (empty slices never count)
            if not (lo <= within < hi) or local_b < self.start_batch or (local_b - self.start_batch) % W != wid:
                continue
            raw.append((p, sample))
            if within == hi - 1:
                # decode the batch; in the training process (workers=0) on one thread and under a forked
                # RNG, and never across a yield (the trainer runs between yields)
                with torch.random.fork_rng(devices=[], enabled=info is None), single_threaded_ops(info is None):
                    items = [self._decode(q, smp) for q, smp in raw]
                    batch = collate(items, self.skip_bad, self.transform)
                raw = []
                yield batch


def build_webdataset(spec):
    from .datasets import DataSplits, need_dir, resolve_hw

    root = need_dir(spec)
    if not root.is_dir():
        raise InputError(f"webdataset: {root} is not a folder of train-*.tar / val-*.tar / test-*.tar shards "
                         "(or of train/, val/, test/ folders of .tar shards)")
    shards = {s: sorted({*root.glob(f"{s}-*.tar"), *(p for d in SPLIT_DIRS[s] for p in (root / d).glob("*.tar"))})
              for s in ("train", "val", "test")}
    if not shards["train"]:
        found = sorted(str(p.relative_to(root)) for p in root.rglob("*.tar"))
        shown = f"{found[:5]}{f' and {len(found) - 5} more' if len(found) > 5 else ''}" if found else "no .tar files"
        raise InputError(f"webdataset: no train-*.tar shards in {root}, nor .tar files in {root / 'train'} "
                         f"(found: {shown})")
    probe: list = []
    index = {s: [kl for sh in shards[s] for kl in index_shard(sh, probe if s == "train" else None, 32)]
             for s in shards if shards[s]}
    if not index["train"]:
        raise InputError(f"webdataset: the train shards in {root} hold no samples")
    class_index = None
    if any(isinstance(lab, str) for s in index for _, lab in index[s]):
        classes, class_index = _named_classes(root, index)
        index = {s: [(k, class_index[str(lab)]) for k, lab in kl] for s, kl in index.items()}
    train_labels = {lab for _, lab in index["train"]}
    if min(train_labels) < 0:
        raise InputError(f"webdataset: negative label {min(train_labels)} in the train shards")
    if class_index is None:
        classes = _class_names(root, train_labels)
    for s in ("val", "test"):
        extra = sorted({lab for _, lab in index.get(s, [])} - train_labels)
        if extra:
            raise InputError(f"webdataset: {s} shards use label(s) {extra[:10]} that no training sample has")
    notes = []
    if "val" not in index:  # never validate on the test shards (vitkit.data.validation)
        raise InputError(f"webdataset: {root} has no val-*.tar shards (nor val/*.tar), and no validation split can "
                         "be held out of streamed shards; add val-*.tar shards (the test shards are never used to "
                         "validate)")
    from .files import image_header

    sizes = []
    for name, data in probe:  # (H, W) of the first training images, from their headers
        try:
            sizes.append(image_header(data, name)[1][::-1])
        except InputError:
            continue
    hw, size_note, from_data = resolve_hw(spec, sizes=sizes)
    mk = lambda s: ShardDataset(shards[s], [lab for _, lab in index[s]], hw, s, class_index)  # noqa: E731
    notes.append("webdataset: " + ", ".join(f"{s} {len(index[s])} samples in {len(shards[s])} shard(s)"
                                            for s in ("train", "val", "test") if s in index))
    return DataSplits(name="webdataset", train=mk("train"), val=mk("val"), test=mk("test") if "test" in index else None,
                      task="classification",
                      num_outputs=len(classes), in_channels=3, image_hw=hw, classes=classes, mean=[0.5] * 3,
                      std=[0.5] * 3, hflip_ok=True, notes=notes, size_note=size_note, size_from_data=from_data)
