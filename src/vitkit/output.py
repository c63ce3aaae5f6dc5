"""The one writer for output: every command that writes files claims its target here first.

``claim_output(target, command=..., kind="dir"|"file", overwrite=, update=, inputs=)`` is a context
manager that yields an :class:`Output`. For the life of the ``with`` block it guarantees
(DESIGN.md rule 15; train, convert, export, embed, eval and explain all go through it):

1. **Nothing of the user's is lost.** A new output (``update=False``) refuses a target that exists
   and is not empty, unless ``overwrite``. A directory target keeps a manifest
   (``.vitkit-manifest.json``) of every file vitkit wrote in it; ``overwrite`` removes only those
   (and the names the command declares its own, ``own=``), keeps everything else and says so; a
   non-empty directory vitkit never wrote in is refused even with ``overwrite``. Inside a claimed
   directory a write onto an existing file vitkit did not write is refused. ``update=True`` (resume,
   eval into a run, embed's append) keeps what is there and writes beside it, under the same rules.
   A file target that exists is replaced only with ``overwrite`` (or ``update``: the command reads
   it first, as embed does its table).
2. **Never through a symlink.** The target, every folder below it that vitkit writes into, the
   file written, the lock file (opened ``O_NOFOLLOW``) and the manifest are checked with ``lstat``;
   a link is refused, naming it. (Only a link at a name that vitkit's manifest lists is removed
   instead, never followed.) Folders *above* the target are the user's layout and are followed.
3. **Never onto an input.** A target equal to an input, or inside an input folder, is refused; so
   is a new target that contains an input (``--overwrite`` there could remove it). Paths are
   compared resolved; inputs that are not local paths (hub ids) are skipped.
4. **Atomic writes, recorded first.** Every :func:`vitkit.io.atomic_write` under a live claim is
   checked (2.) and recorded in the manifest *before* the file appears, so a process killed at any
   point leaves no file of vitkit's unrecorded. Files a command writes another way (a plot, an
   appended log) go through :meth:`Output.file` first, or are declared with ``own=``.
5. **One writer at a time** (:mod:`vitkit.output_lock`). The claim holds ``fcntl.flock`` on
   ``.vitkit.lock`` in the directory (``.NAME.vitkit.lock`` beside a file target), holding
   ``vitkit CMD, pid N on HOST, since TIME``; a second claim fails at once naming that holder. The
   kernel drops the lock when the process dies (even by SIGKILL), so a lock file left by a killed
   process never blocks. The lock file is removed on release. (On a platform without ``fcntl``,
   i.e. Windows, outputs are not locked.)
6. **Stale temporaries are cleaned.** Under the lock (so no live vitkit process is writing there),
   the claim removes the temporaries a killed :func:`vitkit.io.atomic_write` left in the target
   (``.NAME.vitkit-XXXXXXXX.tmp``, :data:`vitkit.io.TEMP_PATTERN`); nothing else.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import io as _io

# OutputBusy and refuse_if_busy are imported from here, beside claim_output
from .output_lock import (  # noqa: F401
    LOCK_NAME,
    OutputBusy,
    OutputError,
    OutputNotEmpty,
    refuse_if_busy,
    release_lock,
    take_lock,
)

MANIFEST_NAME = ".vitkit-manifest.json"
_BOOKKEEPING = (LOCK_NAME, MANIFEST_NAME)


class Output:
    """A claimed target: ``path`` (the directory, or the file), the user's files an overwrite
    ``kept``, and :meth:`file` for writes that do not go through :func:`vitkit.io.atomic_write`."""

    def __init__(self, path: Path, kind: str, command: str, own: tuple[str, ...]) -> None:
        self.path, self.kind, self.command, self.own = path, kind, command, own
        self.kept: list[str] = []
        self._abs = os.path.abspath(path)
        self._files: set[str] = set()  # manifest entries (relative POSIX paths)
        self._mutex = threading.Lock()

    # ------------------------------------------------------------------ what the target covers
    def _base(self) -> str:
        return self._abs if self.kind == "dir" else os.path.dirname(self._abs)

    def covers(self, path: str | Path) -> bool:
        """True for paths this claim writes: under the directory; for a file, the file and its
        companions ``NAME.*`` beside it (embed's ``OUT.parts/``)."""
        a = os.path.abspath(path)
        if self.kind == "dir":
            return a.startswith(self._abs + os.sep)
        rel = os.path.relpath(a, self._base())
        first = rel.split(os.sep, 1)[0]
        return first == os.path.basename(self._abs) or first.startswith(os.path.basename(self._abs) + ".")

    def is_own(self, rel: str) -> bool:
        return rel in self._files or any(fnmatch.fnmatchcase(rel, pat) for pat in self.own)

    # ------------------------------------------------------------------------------- writing
    def file(self, path: str | Path) -> Path:
        """Check and record ``path`` (relative to a directory target, or absolute) before the
        command writes it: no symlink on the way, never over a file vitkit did not write."""
        p = Path(path)
        if not p.is_absolute() and self.kind == "dir":
            p = self.path / p
        self.before_write(p)
        return p

    def before_write(self, path: str | Path) -> None:
        a = os.path.abspath(path)
        base = self._base()
        rel = os.path.relpath(a, base)
        _no_link_below(base, rel)
        if self.kind == "file":
            if os.path.islink(a):
                raise OutputError(f"{a} is a symbolic link; vitkit never writes through one (remove it first)")
            return
        rel = Path(rel).as_posix()
        if rel in _BOOKKEEPING:
            return
        with self._mutex:
            if os.path.lexists(a):
                if not self.is_own(rel):
                    raise OutputError(f"{a} exists and was not written by vitkit; vitkit {self.command} will not "
                                      f"replace it: move it away, or choose another output")
                if os.path.islink(a):  # a link at vitkit's own name: removed, never followed
                    os.unlink(a)
            if rel not in self._files:
                self._files.add(rel)
                self._save_manifest()

    # ------------------------------------------------------------------------------ manifest
    def _manifest(self) -> Path:
        return self.path / MANIFEST_NAME

    def _load_manifest(self) -> bool:
        m = self._manifest()
        if not os.path.lexists(m):
            return False
        if not stat.S_ISREG(os.lstat(m).st_mode):
            raise OutputError(f"{m} is not a regular file (a symbolic link?); vitkit never reads or writes "
                              "through one: remove it")
        try:
            data = json.loads(m.read_text())
            files = data["files"]
            if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
                raise TypeError("'files' is not a list of names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputError(f"{m}: not a vitkit manifest ({e}); vitkit cannot tell which files it wrote there: "
                              "choose another output") from e
        # an entry that climbs out of the target is not one vitkit wrote
        self._files = {f for f in files if f and not os.path.isabs(f) and ".." not in Path(f).parts}
        return True

    def _save_manifest(self) -> None:
        text = json.dumps({"written_by": "vitkit", "command": self.command, "files": sorted(self._files)},
                          indent=1) + "\n"
        _io.atomic_write_text(self._manifest(), text)

    # ------------------------------------------------------------------------------ removing
    def _own_present(self) -> list[str]:
        """The names that match ``own`` (globbed per pattern: no walk of a large user folder)."""
        found = []
        for pat in self.own:
            for p in self.path.glob(pat):
                rel = Path(os.path.relpath(p, self.path)).as_posix()
                if rel not in _BOOKKEEPING:
                    found.append(rel)
        return found

    def _remove_own(self) -> None:
        """Remove the files vitkit wrote (manifest + ``own``), never following a link; empty
        folders they leave are removed too; what remains is the user's (``kept``)."""
        for rel in sorted(self._files | set(self._own_present())):
            cur = self.path
            for part in Path(rel).parts:
                cur = cur / part
                if os.path.islink(cur):  # a link where vitkit wrote: removed, its target untouched
                    os.unlink(cur)
                    break
                if not cur.exists():
                    break
            else:
                if cur.is_file():
                    cur.unlink()
            for parent in Path(rel).parents:  # folders vitkit's files leave empty
                if parent != Path("."):
                    with contextlib.suppress(OSError):
                        (self.path / parent).rmdir()
        self._files = set()
        self._save_manifest()
        self.kept = _user_files(self.path)


def _user_files(path: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = Path(os.path.relpath(os.path.join(dirpath, n), path)).as_posix()
            if rel not in _BOOKKEEPING:
                out.append(rel)
    return sorted(out)


def _no_link_below(base: str, rel: str) -> None:
    """Refuse when a folder between ``base`` and ``base/rel`` is a symlink (or not a folder)."""
    cur = base
    for part in Path(rel).parts[:-1]:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise OutputError(f"{cur} is a symbolic link; vitkit never writes through one (remove it, or choose "
                              "another output)")


# ------------------------------------------------------------------------ the live claims
_ACTIVE: list[Output] = []


def _before_write(path: Path) -> None:
    for out in reversed(_ACTIVE):
        if out.covers(path):
            out.before_write(path)
            return


_io.WRITE_CHECKS.append(_before_write)

# ------------------------------------------------------------------------------ checks
def _check_inputs(target: Path, inputs: Iterable, update: bool) -> None:
    t = Path(os.path.realpath(target))
    for i in inputs:
        if i is None:
            continue
        p = Path(os.path.expanduser(str(i)))
        if not os.path.lexists(p):  # a hub id or a preset name, not a local path
            continue
        r = Path(os.path.realpath(p))
        why = ("is" if t == r else "is inside" if r in t.parents
               else "contains" if (not update and t in r.parents) else None)
        if why:
            raise OutputError(f"the output {target} {why} the input {i}; vitkit never writes onto what it reads: "
                              "choose another output")


def _clean_stale_temps(out: Output) -> None:
    """Remove the temporaries of vitkit's own atomic writes that a killed process left behind: in the
    folders vitkit writes (the target and the folders of its manifest's files; for a file target,
    beside it and in its companions ``NAME.*/``), never elsewhere in a user's tree."""
    if out.kind == "dir":
        folders = {out.path} | {(out.path / rel).parent for rel in out._files | set(out._own_present())}
        name = None
    else:
        parent, name = out.path.parent, out.path.name
        folders = {parent} | {parent / n for n in os.listdir(parent) if n.startswith(name + ".")}
    for folder in folders:
        if os.path.islink(folder) or not folder.is_dir():
            continue
        for n in os.listdir(folder):
            m = _io.TEMP_PATTERN.match(n)
            if m and (name is None or folder != out.path.parent or m.group("name") == name) \
                    and stat.S_ISREG(os.lstat(folder / n).st_mode):
                os.unlink(folder / n)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


@contextlib.contextmanager
def claim_output(target: str | Path, *, command: str, kind: str = "dir", overwrite: bool = False,
                 update: bool = False, inputs: Iterable = (), own: Iterable[str] = (), fresh: bool = False,
                 busy_hint: str = "wait for it to finish, or choose another output",
                 note: Callable[[str], None] = _say,
                 replaceable: Callable[[Path], str | None] | None = None) -> Iterator[Output]:
    """Own ``target`` for the ``with`` block (see the module docstring for what that guarantees).

    ``kind``: "dir" (a folder of files, with a manifest) or "file". ``update``: add to what is
    there instead of starting afresh. ``inputs``: the paths the command reads. ``own``: glob
    patterns (relative to a directory target) of names this command writes without
    :func:`vitkit.io.atomic_write` (an appended log, a plot, TensorBoard events): they count as
    vitkit's. ``fresh``: the caller has just created the (empty) directory; it is removed again
    if nothing is written. ``note`` tells the user which of their files an overwrite kept.
    ``replaceable(path)``: for a non-empty target whose every file vitkit's manifest lists, a reason to
    replace what is there without ``overwrite`` (train: a run that died before its first checkpoint),
    or None; asked under the lock, the reason noted."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    path = Path(target)
    if os.path.islink(path):
        raise OutputError(f"{path} is a symbolic link; vitkit never writes through one: remove it, or give the real "
                          "path")
    _check_inputs(path, inputs, update)
    out = Output(path, kind, command, tuple(own))
    lock_path, created = _make_target(path, kind)
    created = created or fresh
    fd = take_lock(lock_path, path, command, busy_hint)
    try:
        _prepare_claimed(out, overwrite=overwrite, update=update, note=note, replaceable=replaceable)
        _ACTIVE.append(out)
        yield out
    finally:
        if out in _ACTIVE:
            _ACTIVE.remove(out)
        if kind == "dir" and created and not [n for n in os.listdir(path) if n not in _BOOKKEEPING]:
            (path / MANIFEST_NAME).unlink(missing_ok=True)
            release_lock(fd, lock_path)
            with contextlib.suppress(OSError):
                path.rmdir()  # a claim that wrote nothing leaves no empty directory behind
        else:
            release_lock(fd, lock_path)


def _make_target(path: Path, kind: str) -> tuple[Path, bool]:
    """(lock file, whether the directory was created here): the target directory (or a file
    target's folder) made when missing."""
    if kind == "dir":
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path} is a file, not a directory")
        created = not path.exists()
        if created:
            path.mkdir(parents=True)
        return path / LOCK_NAME, created
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.vitkit.lock"), False


def _prepare_claimed(out: Output, *, overwrite: bool, update: bool, note: Callable[[str], None],
                     replaceable: Callable[[Path], str | None] | None = None) -> None:
    """Under the lock: clean stale temporaries, then refuse (or, with ``overwrite``, clear) what is
    there, and remove links at the names this command writes (see the module docstring, 1. and 2.)."""
    path = out.path
    has_manifest = out.kind == "dir" and out._load_manifest()
    _clean_stale_temps(out)
    if out.kind == "dir":
        entries = [n for n in os.listdir(path) if n not in _BOOKKEEPING]
        if entries and not update:
            if not overwrite and replaceable is not None and has_manifest \
                    and set(_user_files(path)) <= out._files and (why := replaceable(path)):
                note(f"vitkit {out.command}: {path} holds only {why}: replacing it")
                overwrite = True
            _refuse_or_clear(out, entries, has_manifest, overwrite, note)
        # a link at a name (or folder) this command writes is removed, never followed
        for pat in out.own:
            cur = path
            for part in Path(pat).parts if not any(c in pat for c in "*?[") else ():
                cur = cur / part
                if os.path.islink(cur):
                    os.unlink(cur)
                    break
    else:
        for n in os.listdir(path.parent):  # companions (embed's OUT.parts/) are written too
            if n.startswith(path.name + ".") and os.path.islink(path.parent / n):
                raise OutputError(f"{path.parent / n} is a symbolic link; vitkit never writes through one "
                                  "(remove it, or choose another output)")
    if out.kind == "file" and path.exists() and not (overwrite or update):
        raise OutputNotEmpty(f"{path} already exists; vitkit {out.command} will not replace it: choose another "
                             "output, or pass --overwrite to replace it")


def _refuse_or_clear(out: Output, entries: list[str], has_manifest: bool, overwrite: bool,
                     note: Callable[[str], None]) -> None:
    path = out.path
    listed = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
    vitkits = has_manifest or bool(out._own_present())
    if not overwrite:
        raise OutputNotEmpty(f"{path} is not empty ({listed}); vitkit {out.command} writes only into a new or "
                             "empty folder: choose another output"
                             + (", or pass --overwrite to replace what vitkit wrote there (other files are kept)"
                                if vitkits else ""))
    if not vitkits:
        raise OutputNotEmpty(f"{path} is not empty ({listed}) and vitkit wrote nothing there; --overwrite only "
                             "ever removes files vitkit wrote: choose another output")
    out._remove_own()
    if out.kept:
        shown = ", ".join(out.kept[:10]) + (f", ... ({len(out.kept)} in all)" if len(out.kept) > 10 else "")
        note(f"vitkit {out.command}: --overwrite removed what vitkit wrote in {path} and kept {len(out.kept)} "
             f"file(s) it did not write: {shown}")


def json_text(obj, indent: int | None = 2) -> str:
    """``obj`` as strictly valid JSON, the one way vitkit prints or saves JSON reports: a non-finite
    float (a loss that became NaN, an R^2 of a constant target) is written as ``null``, never as
    ``NaN`` / ``Infinity``, which JSON has no words for and strict parsers refuse."""
    import math

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=indent, allow_nan=False)
