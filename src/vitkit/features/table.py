"""The embeddings table: a parquet file of ``path`` (string), ``label`` (string or null) and
``embedding`` (list<float32>), with the stamp columns of what each row was computed from (``file``,
``size``, ``mtime_ns``, ``blake2b``: a :class:`vitkit.freshness.Stamp`, null for rows that are not
files) and, under the schema metadata key ``vitkit.features``, how the vectors were made.

Its schema, metadata, the resumable writer :mod:`vitkit.features.embed` streams batches into (parts
merged at the end; see that module's docstring), and :func:`write_embeddings` for vectors computed
elsewhere. ``search`` reads what is written here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..deps import require
from ..errors import ConfigError, InputError
from ..freshness import FRESH, Stamp, check
from ..io import atomic_write

META_KEY = b"vitkit.features"
# the settings that decide what a vector means: rows made with different ones must not mix
# ("preprocess": the input size, mean / std, resize and crop the images went through; tables written
# before it was recorded are not held to it)
_MUST_MATCH = ("model", "preprocess", "pool", "layers", "normalize", "dtype", "dim")


def read_meta(path: str | Path) -> dict:
    """The ``vitkit.features`` metadata of an embeddings parquet file ({} when absent)."""
    pq = require("pyarrow.parquet", "reading embeddings", "features")
    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


# What each row was computed from (a vitkit.freshness.Stamp); null for rows that are not files.
STAMP_COLUMNS = ("file", "size", "mtime_ns", "blake2b")


def _schema(meta: dict):
    pa = require("pyarrow", "writing embeddings", "features")
    return pa.schema([("path", pa.string()), ("label", pa.string()), ("embedding", pa.list_(pa.float32())),
                      ("file", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("blake2b", pa.string())],
                     metadata={META_KEY: json.dumps(meta).encode()})


def _stamp_arrays(pa, stamps: list[Stamp | None]) -> list:
    """The STAMP_COLUMNS of rows with these stamps (None: not a file)."""
    return [pa.array([None if st is None else getattr(st, c) for st in stamps], t)
            for c, t in zip(STAMP_COLUMNS, (pa.string(), pa.int64(), pa.int64(), pa.string()))]



class ResumableOutput:
    """Parts written as batches finish, merged into ``out`` at the end (see the module docstring).
    The rows already in ``out`` and its parts are filed by key (their file's absolute path, or their
    name when they are not a file; a later part's row replaces an earlier one of the same key);
    :meth:`review` checks each against its file and marks which go into the merged ``out``."""

    def __init__(self, out: Path, meta: dict, overwrite: bool, row_group_size: int, note: Callable) -> None:
        self.pa = require("pyarrow", "writing embeddings", "features")
        self.pq = require("pyarrow.parquet", "writing embeddings", "features")
        self.out, self.meta, self.row_group_size, self.note = out, meta, max(1, row_group_size), note
        self.parts_dir = out.with_name(out.name + ".parts")
        self.schema = None  # made at the first batch, when the vectors' width is known
        self.dim: int | None = None
        if overwrite and self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
        self.sources: list[Path] = []  # earlier output + parts, in order
        self.keep: list[np.ndarray | None] = []  # per source: its rows that go into out (None: all)
        self.restamp: list[dict[int, Stamp]] = []  # per source: rows whose file was only touched (new mtime)
        # key -> (source, row, path, label, stamp) of its latest row
        self.found: dict[str, tuple[int, int, str, str | None, Stamp | None]] = {}
        if out.exists() and not overwrite:
            self._adopt(out)
        self.next_part = 0
        if self.parts_dir.is_dir():
            for part in sorted(self.parts_dir.glob("part-*.parquet")):
                self._adopt(part)
                self.next_part = max(self.next_part, int(part.stem.split("-")[1]) + 1)
        self.buf: list[tuple[list[str], list, np.ndarray, list[Stamp | None]]] = []
        self.buffered = 0
        self.new_rows = 0

    def _adopt(self, path: Path) -> None:
        try:
            meta = read_meta(path)
            names = self.pq.read_schema(path).names
            missing = [c for c in STAMP_COLUMNS if c not in names]
            table = None if missing else self.pq.read_table(path, columns=["path", "label", *STAMP_COLUMNS])
        except (OSError, self.pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read the earlier embeddings ({e}); delete it or pass --overwrite") from e
        diff = {k: (meta.get(k), self.meta.get(k)) for k in _MUST_MATCH
                if k != "dim" and meta.get(k) != self.meta.get(k) and (k != "preprocess" or k in meta)}
        if self.dim is None:
            self.dim = meta.get("dim")
        if diff:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigError(f"{path} holds embeddings made with other settings ({what}); pass --overwrite "
                              "to start over, or choose another --out")
        if missing:
            raise ConfigError(f"{path} has no columns saying what its rows were computed from ({', '.join(missing)}: "
                              "written by an older vitkit), so they cannot be checked against their files; pass "
                              "--overwrite to embed everything again, or choose another --out")
        s = len(self.sources)
        cols = [table.column(c).to_pylist() for c in ("path", "label", *STAMP_COLUMNS)]
        for r, (p, label, file, size, mtime_ns, digest) in enumerate(zip(*cols)):
            st = None if file is None else Stamp(file, size, mtime_ns, digest)
            self.found[p if file is None else file] = (s, r, p, label, st)
        self.sources.append(path)
        self.keep.append(np.zeros(table.num_rows, dtype=bool))
        self.restamp.append({})

    def review(self) -> dict[str, str]:
        """Check every row found against its file: {key: fresh | changed | gone}. Fresh rows are
        kept (rows that are not files count as fresh); the others are left out of the merge."""
        status = {}
        for key, (s, r, _, _, st) in self.found.items():
            state, now = (FRESH, None) if st is None else check(st)
            status[key] = state
            if state == FRESH:
                self.keep[s][r] = True
                if now is not None and now != st:
                    self.restamp[s][r] = now
        return status

    def add(self, paths: list[str], labels: list, feats: np.ndarray, stamps: list[Stamp | None]) -> None:
        if not paths:
            return
        self.buf.append((paths, labels, feats, stamps))
        self.buffered += len(paths)
        if self.buffered >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        pa = self.pa
        paths = [p for b in self.buf for p in b[0]]
        labels = [v for b in self.buf for v in b[1]]
        stamps = [st for b in self.buf for st in b[3]]
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
        table = pa.Table.from_arrays([pa.array(paths, pa.string()), pa.array(labels, pa.string()), emb,
                                      *_stamp_arrays(pa, stamps)], schema=self.schema)
        part = self.parts_dir / f"part-{self.next_part:05d}.parquet"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(part, lambda tmp: self.pq.write_table(table, tmp))
        self.sources.append(part)
        self.keep.append(None)
        self.restamp.append({})
        self.next_part += 1
        self.new_rows += N
        self.buf, self.buffered = [], 0

    def finish(self) -> int:
        """Merge the kept rows into ``out``; returns its row count."""
        self.flush()
        if self.schema is None:  # nothing new: keep the earlier rows' own schema
            self.schema = self.pq.read_schema(self.sources[0])
        untouched = (self.sources == [self.out] and self.keep[0] is not None and bool(self.keep[0].all())
                     and not self.restamp[0])
        if not untouched:
            pa, names = self.pa, list(self.schema.names)

            def write(tmp):
                with self.pq.ParquetWriter(tmp, self.schema) as w:
                    for src, keep, restamp in zip(self.sources, self.keep, self.restamp):
                        pf = self.pq.ParquetFile(src)
                        at = 0
                        for g in range(pf.num_row_groups):
                            t = pf.read_row_group(g).select(names)
                            n = t.num_rows
                            if restamp and any(r in restamp for r in range(at, at + n)):
                                mtime = t.column("mtime_ns").to_pylist()
                                for r in range(at, at + n):
                                    if r in restamp:
                                        mtime[r - at] = restamp[r].mtime_ns
                                t = t.set_column(names.index("mtime_ns"), "mtime_ns", pa.array(mtime, pa.int64()))
                            if keep is not None:
                                t = t.filter(pa.array(keep[at:at + n]))
                            at += n
                            if t.num_rows:
                                w.write_table(t.replace_schema_metadata(self.schema.metadata))
            atomic_write(self.out, write)
        if self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
        return self.pq.ParquetFile(self.out).metadata.num_rows



def write_embeddings(out, paths: list[str], labels: list, vectors, meta: dict | None = None,
                     row_group_size: int = 65536) -> Path:
    """Write vectors you computed elsewhere as an embeddings table (same schema as ``embed``, no
    file stamps), atomically. ``vectors``: (N, D) float32 array, or an iterable of (B, D) blocks
    in row order, all finite."""
    pa = require("pyarrow", "writing embeddings", "features")
    pq = require("pyarrow.parquet", "writing embeddings", "features")
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
                    refuse_non_finite(part, paths[at:at + N], str(out), at)
                    if schema is None:
                        schema = _schema({"model": None, **(meta or {}), "dim": F})
                        writer = pq.ParquetWriter(tmp, schema)
                    emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (N + 1) * F, F, dtype=np.int64)
                                                            .astype(np.int32)), pa.array(part.reshape(-1)))
                    writer.write_table(pa.Table.from_arrays(
                        [pa.array(paths[at:at + N], pa.string()), pa.array(labels[at:at + N], pa.string()), emb,
                         *_stamp_arrays(pa, [None] * N)], schema=schema))
                    at += N
        finally:
            if writer is not None:
                writer.close()
        if at != len(paths):
            raise InputError(f"{len(paths)} paths but {at} vectors")

    return atomic_write(out, write)


def refuse_non_finite(block: np.ndarray, names: list[str], where: str, first_row: int = 0) -> None:
    """InputError naming the first row of ``block`` (B, D) that holds NaN or inf: a non-finite vector
    has no cosine similarity and would rank first or last for every query."""
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        r = int(np.argmax(bad))
        raise InputError(f"{where}: row {first_row + r} ({names[r]}) holds NaN or inf values "
                         f"({int(bad.sum())} such row(s) in this block); an index takes finite vectors only")
