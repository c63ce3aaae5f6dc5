"""The one label matcher: a dataset's class names matched to a model's labels by name, never by
position. eval (eval --zeroshot included) and the per-split class lists of Hugging Face data and shards call
:func:`match_labels`; a new command that scores a labelled model on labelled data calls it too.

Folders sort their class names alphabetically, so a model trained on ``face`` / ``nonface`` read
against folders ``a_nonface`` / ``b_face`` would score 2.5 % instead of 97.5 % if output i were
taken to mean dataset class i. Instead:

* the same names in another order are remapped (the targets are read in the model's output order);
* any difference is refused, naming both lists, unless an explicit label map
  (``--label-map data_name=model_label,...`` or a file) says which model label each class is
  (several classes may map to one label; every label must be named);
* a model without labels (None) keeps position matching, and the result says so.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError

SHOWN = 5  # names listed in a message before "... (N more)"


@dataclass(frozen=True)
class LabelMatch:
    """``index[i]``: the model output that dataset class i means. ``by``: "name", "label map" or
    "position" (the model has no labels); ``note``: one line for the user, or None when the names
    match in the same order."""

    index: tuple[int, ...]
    by: str
    note: str | None = None

    @property
    def identity(self) -> bool:
        return self.index == tuple(range(len(self.index)))


def _show(names) -> str:
    names = list(names)
    more = f" ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return repr(names[:SHOWN])[:-1] + more + "]"


def check_unique(names, where: str) -> None:
    """Class names must be distinct: two classes of one name cannot be told apart by name."""
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise InputError(f"{where}: class name(s) {_show(dup)} appear more than once; each class needs its own name")


def parse_label_map(spec: str | None) -> dict[str, str] | None:
    """``--label-map``: a file (a JSON object, or ``data_name=model_label`` lines) or inline
    ``a=b,c=d``. Keys are the dataset's class names, values the model's labels."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            entries, where = [line for line in text.splitlines() if line.strip()], f"--label-map {path}"
        else:
            if not isinstance(data, dict):
                raise ConfigError(f"--label-map {path}: expected a JSON object {{data_class: model_label}}, "
                                  f"got {type(data).__name__}")
            return {str(k): str(v) for k, v in data.items()}
    else:
        entries, where = spec.split(","), "--label-map"
    out: dict[str, str] = {}
    for e in entries:
        k, sep, v = e.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ConfigError(f"{where}: expected data_class=model_label entries, got {e.strip()!r}")
        if k.strip() in out:
            raise ConfigError(f"{where}: class {k.strip()!r} is mapped twice")
        out[k.strip()] = v.strip()
    return out


def match_labels(model_labels, dataset_classes, label_map: dict[str, str] | None = None, *,
                 num_outputs: int | None = None, what: str = "the model", map_option: bool = True) -> LabelMatch:
    """Which output of the model each dataset class is (see the module docstring).

    ``model_labels``: the model's labels (``model.labels``) or None; ``dataset_classes``: the data's
    class names in its target order; ``label_map``: {data class: model label} for names that
    differ; ``num_outputs``: the model's output count (checked when matching by position);
    ``what``: how messages name the labelled side; ``map_option``: whether the command has
    ``--label-map`` (a refusal then suggests it)."""
    classes = [str(c) for c in dataset_classes]
    check_unique(classes, "the data")
    if model_labels is None:
        if label_map:
            raise ConfigError(f"--label-map needs {what}'s labels by name, and {what} has none")
        if num_outputs is not None and num_outputs != len(classes):
            raise InputError(f"{what} has {num_outputs} outputs and no labels; the data has {len(classes)} "
                             f"classes {_show(classes)}")
        return LabelMatch(tuple(range(len(classes))), "position",
                          f"note: {what} has no labels; its outputs are taken to be the data's classes in the "
                          f"data's order {_show(classes)}")
    labels = [str(x) for x in model_labels]
    label_map = dict(label_map or {})
    unknown = [k for k in label_map if k not in classes]
    if unknown:
        raise ConfigError(f"--label-map names class(es) {_show(unknown)} that the data does not have; its "
                          f"classes are {_show(classes)}")
    bad = [v for v in label_map.values() if v not in labels]
    if bad:
        raise ConfigError(f"--label-map maps to {_show(bad)}, not among {what}'s labels {_show(labels)}")
    wanted = [label_map.get(c, c) for c in classes]
    missing = [c for c, w in zip(classes, wanted) if w not in labels]
    extra = [x for x in labels if x not in wanted]
    if missing or extra:
        # no suggested pairs: guessing which name is which is the position matching this module exists to avoid
        hint = "" if label_map or not map_option else \
            "; if they are the same classes under other names, say which is which: --label-map data_class=model_label,..."
        raise InputError(f"the data's classes do not match {what}'s labels: the data has {_show(classes)}, "
                         f"{what} {_show(labels)}; "
                         + "; ".join(part for part in (
                             f"not among {what}'s labels: {_show(missing)}" if missing else "",
                             f"{what}'s labels not in the data: {_show(extra)}" if extra else "") if part) + hint)
    pos = {}
    for i, x in enumerate(labels):
        pos.setdefault(x, []).append(i)
    ambiguous = [w for w in dict.fromkeys(wanted) if len(pos[w]) > 1]
    if ambiguous:
        raise InputError(f"{what} has more than one output labelled {_show(ambiguous)}; those classes cannot be "
                         "matched by name")
    index = tuple(pos[w][0] for w in wanted)
    if label_map:
        note = f"note: classes mapped by --label-map: {_show(f'{k}={v}' for k, v in label_map.items())}"
    elif index != tuple(range(len(index))):
        note = (f"note: classes matched to {what}'s labels by name (the data's order {_show(classes)}, "
                f"{what}'s {_show(labels)})")
    else:
        note = None
    return LabelMatch(index, "label map" if label_map else "name", note)
