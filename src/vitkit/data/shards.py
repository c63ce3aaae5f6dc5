"""WebDataset tar shards: ``DIR/train-*.tar``, ``DIR/val-*.tar``, ``DIR/test-*.tar``.

Each sample is an image (``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp``) and its label (``.cls``: an
integer as text), grouped by key as the ``webdataset`` library does. Class names come from
``classes.txt`` (one per line) or ``classes.json`` (a list, or {index: name}) beside the shards,
else the label values themselves ("0", "1", ...).

Before training, every shard's member list and labels are read (``tarfile``: headers and the small
``.cls`` members only): a sample without a label or an image, a label that is not an integer or a
val / test label the training shards never use is an error naming the shard and the sample key.

Streaming, epoch ``e``: the shard order is shuffled with (seed, e), the samples go through
webdataset's shuffle buffer seeded with (seed, e); that one global stream is cut into global
batches (the last partial one dropped when training) and rank r of N takes its slice of each, so
the ranks and workers together see every sample at most once per epoch and every rank gets the same
number of equal batches. Each worker reads the (whole) stream of tar bytes and decodes only the
samples of its own batches (batch b goes to worker b mod W, the order in which the DataLoader
collects them), so the batches are identical for any ``--workers``. Reading every shard in every
worker costs I/O (tar bytes are cheap next to JPEG decoding on a local disk); with many remote
shards, pre-split them instead.

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
from torch.utils.data import IterableDataset

from ..errors import InputError
from .deps import require

log = logging.getLogger("vitkit.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000


def _key_ext(name: str) -> tuple[str, str] | None:
    """webdataset's grouping rule: key = path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def index_shard(path: Path, probe: list | None = None, probe_k: int = 0):
    """[(key, label)] of one shard, checking every sample has an image and an integer .cls."""
    out = []
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"webdataset: {path}: not a readable tar file ({e})") from None
    with tf:
        cur, files, label = None, set(), None

        def close():
            if cur is None:
                return
            if label is None:
                raise InputError(f"webdataset: {path}: sample {cur!r} has no .cls label (files: "
                                 f"{', '.join(sorted(files))}); every sample needs KEY.cls with an integer class")
            if not files & set(IMAGE_EXTS):
                raise InputError(f"webdataset: {path}: sample {cur!r} has no image ({', '.join(IMAGE_EXTS)}); "
                                 f"files: {', '.join(sorted(files))}")
            out.append((cur, label))

        for m in tf:
            if not m.isfile():
                continue
            ke = _key_ext(m.name)
            if ke is None:
                continue
            key, ext = ke
            if key != cur:
                close()
                cur, files, label = key, set(), None
            files.add(ext)
            if ext == "cls":
                raw = tf.extractfile(m).read()
                try:
                    label = int(raw.decode().strip())
                except ValueError:
                    raise InputError(f"webdataset: {path}: sample {key!r}: .cls must hold an integer, got "
                                     f"{raw[:40]!r}") from None
            elif ext in IMAGE_EXTS and probe is not None and len(probe) < probe_k:
                probe.append((f"{path}:{m.name}", tf.extractfile(m).read()))
        close()
    return out


def _class_names(root: Path, labels: set[int]) -> list[str]:
    txt, js = root / "classes.txt", root / "classes.json"
    if txt.is_file():
        names = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
        src = txt
    elif js.is_file():
        data = json.loads(js.read_text())
        names = [str(v) for v in data] if isinstance(data, list) else \
            [str(data[k]) for k in sorted(data, key=lambda k: int(k))]
        src = js
    else:
        return [str(i) for i in range(max(labels) + 1)]
    if labels and max(labels) >= len(names):
        raise InputError(f"webdataset: {src} names {len(names)} classes but the shards use label {max(labels)}")
    return names


class ShardDataset:
    """One split's shards, indexed (sample count, labels); ``stream(...)`` gives the per-epoch
    IterableDataset the loader iterates."""

    in_memory = False

    def __init__(self, shards: list[Path], labels: list[int], image_hw, split: str):
        self.shards, self.split = [str(s) for s in shards], split
        self.targets = torch.tensor(labels, dtype=torch.long)
        self.image_hw = tuple(image_hw)
        self.limit = len(labels)
        self.skip_bad = False

    def __len__(self) -> int:
        return self.limit

    def subset(self, idx) -> ShardDataset:
        """The first len(idx) samples of each epoch's stream (``--subset``)."""
        out = ShardDataset([Path(s) for s in self.shards], self.targets.tolist(), self.image_hw, self.split)
        out.limit = min(len(list(idx)), self.limit)
        return out

    def stream(self, **kw) -> ShardStream:
        return ShardStream(self, **kw)


class ShardStream(IterableDataset):
    def __init__(self, ds: ShardDataset, *, batch_size: int, train: bool, seed: int, rank: int, world_size: int,
                 drop_last: bool, transform, skip_bad: bool):
        self.shards, self.n, self.split = ds.shards, ds.limit, ds.split
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

        wds = require("webdataset", "--dataset webdataset")
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
            y = int(bytes(sample["cls"]).decode().strip())
        except (InputError, ValueError) as e:
            return _Bad(f"{e} ({self.split} shard sample)")
        torch.manual_seed(sample_seed(self.seed, self.epoch, p))
        return self.transform(x), torch.tensor(y)

    def __iter__(self):
        from .loader import collate

        info = torch.utils.data.get_worker_info()
        wid, W = (info.id, info.num_workers) if info is not None else (0, 1)
        n_global, B = self._n_global(), self.B
        items, local_b = [], -1
        with torch.random.fork_rng(devices=[], enabled=info is None):
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
                items.append(self._decode(p, sample))
                if within == hi - 1:
                    yield collate(items, self.skip_bad)
                    items = []


def build_webdataset(spec):
    from .datasets import DataSplits, _need_dir, resolve_hw

    root = _need_dir(spec)
    if not root.is_dir():
        raise InputError(f"webdataset: {root} is not a folder of train-*.tar / val-*.tar / test-*.tar shards")
    shards = {s: sorted(root.glob(f"{s}-*.tar")) for s in ("train", "val", "test")}
    if not shards["train"]:
        found = sorted(p.name for p in root.glob("*.tar"))[:5]
        raise InputError(f"webdataset: no train-*.tar shards in {root} (found: {found or 'no .tar files'})")
    probe: list = []
    index = {s: [kl for sh in shards[s] for kl in index_shard(sh, probe if s == "train" else None, 32)]
             for s in shards if shards[s]}
    if not index["train"]:
        raise InputError(f"webdataset: the train shards in {root} hold no samples")
    train_labels = {lab for _, lab in index["train"]}
    if min(train_labels) < 0:
        raise InputError(f"webdataset: negative label {min(train_labels)} in the train shards")
    classes = _class_names(root, train_labels)
    for s in ("val", "test"):
        extra = sorted({lab for _, lab in index.get(s, [])} - train_labels)
        if extra:
            raise InputError(f"webdataset: {s} shards use label(s) {extra[:10]} that no training sample has")
    notes = []
    if "val" not in index and "test" not in index:
        raise InputError(f"webdataset: {root} has train shards but no val-*.tar or test-*.tar to validate on")
    if "val" not in index or "test" not in index:
        only = "val" if "val" in index else "test"
        index["test" if only == "val" else "val"] = index[only]
        shards["test" if only == "val" else "val"] = shards[only]
        notes.append(f"webdataset: only {only}-*.tar found; it serves as both validation and test set")
    spec_paths = None
    if not spec.image_size:
        from .files import image_header

        sizes = []
        for name, data in probe:
            try:
                sizes.append(image_header(data, name)[1][::-1])
            except InputError:
                continue
        spec_paths = sizes
    hw, size_note, from_data = _resolve_from_sizes(spec, spec_paths, resolve_hw)
    mk = lambda s: ShardDataset(shards[s], [lab for _, lab in index[s]], hw, s)  # noqa: E731
    notes.append("webdataset: " + ", ".join(f"{s} {len(index[s])} samples in {len(shards[s])} shard(s)"
                                            for s in ("train", "val", "test")))
    return DataSplits(name="webdataset", train=mk("train"), val=mk("val"), test=mk("test"), task="classification",
                      num_outputs=len(classes), in_channels=3, image_hw=hw, classes=classes, mean=[0.5] * 3,
                      std=[0.5] * 3, hflip_ok=True, notes=notes, size_note=size_note, size_from_data=from_data)


def _resolve_from_sizes(spec, sizes, resolve_hw):
    """resolve_hw's rule, from already probed (H, W) sizes."""
    from .spec import DEFAULT_FILE_IMAGE_SIZE, PROBE_MAX_SIDE

    if spec.image_size or not sizes:
        return resolve_hw(spec)
    common = set(sizes)
    d = DEFAULT_FILE_IMAGE_SIZE
    if len(common) == 1:
        (h, w), = common
        if max(h, w) <= PROBE_MAX_SIDE:
            return (h, w), f"all {len(sizes)} probed images are {w}x{h} (W x H): trained at that size", True
    return (d, d), f"probed shard images differ in size or exceed {PROBE_MAX_SIDE}: default {d}x{d}", False
