"""Building a run before running it (vitkit.train.build), and the one-way layering train -> eval."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from test_train_features import _pretrained  # the one tiny pretrained source of the trainer tests

SRC = Path(__file__).resolve().parents[1] / "src" / "vitkit"


def _imported_modules(text: str, package: str) -> set[str]:
    """Every module a file of ``package`` imports, function-level imports included, as absolute names."""
    parts = package.split(".")
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return found


def _imports_train(path: Path) -> list[str]:
    package = ".".join(["vitkit", *path.relative_to(SRC).parent.parts])
    return sorted(m for m in _imported_modules(path.read_text(), package)
                  if m == "vitkit.train" or m.startswith("vitkit.train."))


@pytest.mark.parametrize("layer", ["eval", "data", "distributed.py"])
def test_evaluation_and_data_never_import_training(layer):
    """train imports eval (the validation of each epoch), never the other way round."""
    files = [SRC / layer] if layer.endswith(".py") else sorted((SRC / layer).glob("*.py"))
    back = {f.name: _imports_train(f) for f in files}
    assert files and not any(back.values()), back


def test_the_layering_check_sees_late_and_relative_imports():
    """The oracle above can fail: what evaluate.py imports is seen, and so is a function-level
    ``from ..train.loop import train`` or ``from .. import train``."""
    assert {"vitkit.eval.metrics", "vitkit.distributed"} <= _imported_modules((SRC / "eval" / "evaluate.py").read_text(),
                                                                            "vitkit.eval")
    late = "def f():\n    from ..train.loop import train\n    from .. import train as t\n"
    assert {"vitkit.train.loop", "vitkit.train"} <= _imported_modules(late, "vitkit.eval")


def test_build_run_reads_and_checks_the_pretrained_source_once_and_builds_a_frozen_run(tmp_path, monkeypatch):
    import vitkit.train.arch as arch
    from vitkit.distributed import DistInfo
    from vitkit.train.build import build_run
    from vitkit.train.config import TrainConfig

    checks = []
    real_check = arch.check_fixed_arch
    monkeypatch.setattr(arch, "check_fixed_arch", lambda *a: checks.append(a[2]) or real_check(*a))
    pre = _pretrained(tmp_path)
    cfg = TrainConfig(pretrained=str(pre), subset=32, batch_size=16, epochs=1, workers=0, progress=False)
    logs: list[str] = []
    run, st = build_run(cfg, torch.device("cpu"), DistInfo(), logs.append)
    assert checks == [f"--pretrained {pre}"]
    # the model carries the data's labels and preprocessing from the start; the config records what was built
    assert st.model.labels == [str(i) for i in range(10)] == list(run.data.classes)
    assert st.model.preprocess_cfg["input_size"] == [1, 16, 16]
    assert (run.cfg.dim, run.cfg.depth, run.cfg.patch_size, run.cfg.image_size) == (32, 1, 4, 16)
    assert run.total_steps == len(st.loader) == 2 and run.wrapped is st.model
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.total_steps = 3  # type: ignore[misc]


def test_a_pretrained_model_that_takes_any_size_trains_at_its_preprocessings_size(tmp_path):
    """DINOv2 from Hugging Face keeps a 518-px table but is fed 224 by its processor (and takes any size);
    fine-tuning defaults to the processor's size, said in the log, not to the table's. A model with one
    input size (a plain HF ViT) keeps its own."""
    transformers = pytest.importorskip("transformers")
    from vitkit.interop import read_pretrained
    from vitkit.train.build import pretrained_input_size

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4)
    dino = tmp_path / "dino"
    transformers.Dinov2Model(transformers.Dinov2Config(image_size=56, **small)).save_pretrained(dino)
    transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    hw, why = pretrained_input_size(read_pretrained(dino))
    assert hw == (28, 28) and "preprocessing" in why
    vit = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(image_size=32, **small), add_pooling_layer=False).save_pretrained(vit)
    hw, why = pretrained_input_size(read_pretrained(vit))
    assert hw == (32, 32) and "the pretrained model's" in why
