"""TrainConfig parsing, optimizer groups, schedule, metrics (against sklearn), checkpoint atomicity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitkit import ViT, ViTConfig
from vitkit.errors import CheckpointError, ConfigError
from vitkit.eval.metrics import classification_report, confusion_matrix, regression_report, regression_stats
from vitkit.train.checkpoint import load_state, rng_state, save_state, set_rng_state
from vitkit.train.config import TrainConfig
from vitkit.train.optim import build_optimizer, lr_at, param_groups


def test_config_unknown_key_suggests_and_types_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="lr must be a number"):
        TrainConfig(lr="fast")
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        TrainConfig(dataset="digit")
    c = TrainConfig().replace(epochs="7", betas="0.9 0.95", ema="false", data_dir="none")
    assert (c.epochs, c.betas, c.ema, c.data_dir) == (7, (0.9, 0.95), False, None)
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\nbatch-size: 16\nlr: 0.001\n")
    c = TrainConfig.from_file(f, lr=0.5)
    assert (c.epochs, c.batch_size, c.lr) == (5, 16, 0.5)
    c.save(tmp_path / "out.yaml")
    assert TrainConfig.from_file(tmp_path / "out.yaml") == c
    c.save(tmp_path / "out.json")
    assert TrainConfig.from_file(tmp_path / "out.json") == c


def test_cli_flags_override_config_file(tmp_path):
    from vitkit.cli.main import build_parser
    from vitkit.cli.train import config_from_args

    f = tmp_path / "c.json"
    f.write_text('{"epochs": 5, "dim": 32}')
    args = build_parser().parse_args(["train", "--config", str(f), "--dim", "48", "--no-ema", "--betas", "0.8", "0.9"])
    c = config_from_args(args)
    assert (c.epochs, c.dim, c.ema, c.betas) == (5, 48, False, (0.8, 0.9))
    args = build_parser().parse_args(["train", "--depth", "two"])
    with pytest.raises(ConfigError, match="depth must be an int"):
        config_from_args(args)


def test_lr_schedule_hand_values():
    # warmup 10 steps to 1.0, cosine to 0.1 at step 110
    assert lr_at(0, 110, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 110, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 110, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(60, 110, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, 110, 10, 1.0, 0.1) == pytest.approx(0.1)
    lrs = [lr_at(s, 110, 10, 1.0, 0.1) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_param_groups_no_decay_and_layer_decay():
    m = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, num_classes=3, dim=16, depth=2, num_heads=2,
                      pos_embed="learned"))
    groups = param_groups(m, 0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    for n in ("cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias", "head.bias"):
        assert by_name[n]["weight_decay"] == 0.0, n
    for n in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"):
        assert by_name[n]["weight_decay"] == 0.05, n
    # depth 2: embeddings id 0 -> 0.5**3, block 0 -> 0.5**2, block 1 -> 0.5, head -> 1
    assert by_name["pos_embed"]["lr_scale"] == 0.125
    assert by_name["blocks.0.mlp.fc1.weight"]["lr_scale"] == 0.25
    assert by_name["blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_build_optimizer_is_fused_adamw_with_the_reference_update():
    """vitkit's AdamW runs torch's fused kernel on the CPU and steps exactly as the reference
    per-parameter AdamW on the same groups (to float rounding), and state dicts move between the
    two (old checkpoints resume)."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, in_channels=1, num_classes=3, dim=16, depth=2, num_heads=2)
    a, b = ViT(cfg), ViT(cfg)
    b.load_state_dict(a.state_dict())
    tc = TrainConfig(lr=1e-2, weight_decay=0.5)
    fused = build_optimizer(a, tc)
    groups = param_groups(b, tc.weight_decay, tc.layer_decay)
    for g in groups:
        g.pop("names")
    ref = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, foreach=False)
    assert fused.defaults["fused"] is True
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same random gradients for both (backprop would give the k-bias pure noise)
        grads = [torch.randn(p.shape, generator=gen) for p in a.parameters()]
        for m, opt in ((a, fused), (b, ref)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), ViT(cfg).parameters()))
    assert moved > 1e-3  # the steps did something
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    fused.load_state_dict(ref.state_dict())  # a checkpoint of the unfused optimizer resumes here
    torch.testing.assert_close(fused.state_dict()["state"][0]["exp_avg"], ref.state_dict()["state"][0]["exp_avg"])


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix as sk_cm
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.RandomState(0)
    y = rng.randint(0, 5, 200)
    p = np.where(rng.rand(200) < 0.6, y, rng.randint(0, 5, 200))
    p[p == 4] = 3  # class 4 never predicted: precision undefined -> 0
    cm = confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), 5)
    np.testing.assert_array_equal(cm.numpy(), sk_cm(y, p, labels=range(5)))
    rep = classification_report(cm)
    P, R, F, S = precision_recall_fscore_support(y, p, labels=range(5), zero_division=0)
    np.testing.assert_allclose([c["precision"] for c in rep["per_class"]], P)
    np.testing.assert_allclose([c["recall"] for c in rep["per_class"]], R)
    np.testing.assert_allclose([c["f1"] for c in rep["per_class"]], F)
    assert [c["support"] for c in rep["per_class"]] == S.tolist()
    assert rep["accuracy"] == pytest.approx((y == p).mean())


def test_regression_metrics_match_sklearn_and_sum_over_batches():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.RandomState(1)
    y = rng.randn(50, 2)
    p = y + 0.3 * rng.randn(50, 2)
    st = regression_stats(torch.from_numpy(p[:20]), torch.from_numpy(y[:20])) + \
        regression_stats(torch.from_numpy(p[20:]), torch.from_numpy(y[20:]))
    rep = regression_report(st)
    assert rep["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert rep["rmse"] == pytest.approx(np.mean(np.sqrt(mean_squared_error(y, p, multioutput="raw_values"))))
    assert rep["r2"] == pytest.approx(r2_score(y, p))


def test_checkpoint_atomic_previous_survives_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "train_state.pt"
    save_state(path, {"epoch": 1, "w": torch.ones(3), "rng": rng_state()})

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_state(path)  # weights_only=True load of the previous good state
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["train_state.pt"]  # no temp file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read training state"):
        load_state(path)


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    save_state(tmp_path / "s.pt", {"rng": rng_state()})
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_state(tmp_path / "s.pt")["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that read a tensor's value on the host (``.item()``, ``bool(t)``): each one is a
    host sync when the tensor lives on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_ema_equals_torch_averaged_model_without_host_reads(tmp_path):
    """vitkit's EMA: torch's AveragedModel + get_ema_multi_avg_fn as the oracle (bit-identical over
    updates, and after a state-dict round trip), but no host read of a tensor per update (torch's
    asks ``bool(n_averaged == 0)`` every call: a host sync per step on CUDA)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from vitkit.train.ema import EMA

    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, num_heads=2))
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = EMA(model, 0.9)
    assert set(ema.state_dict()) == set(ref.state_dict())
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ref.update_parameters(model)
        mode = _HostReads()
        with mode:
            ema.update_parameters(model)
        if step:
            assert mode.reads == 0
        for a, b in zip(ema.module.parameters(), ref.module.parameters()):
            assert torch.equal(a, b)
    assert int(ema.n_averaged) == int(ref.n_averaged) == 4
    # resume: a checkpoint written by torch's class (or ours) continues identically
    again = EMA(model, 0.9)
    again.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    ref.update_parameters(model)
    again.update_parameters(model)
    for a, b in zip(again.module.parameters(), ref.module.parameters()):
        assert torch.equal(a, b)
    assert int(again.n_averaged) == 5


def test_normalize_constants_made_once():
    """The per-channel constants are built once per (mean, std, device, dtype): from a list every
    batch they would be a synchronous host-to-GPU copy per training step."""
    from vitkit.eval.evaluate import _norm_consts, normalize

    x = torch.rand(2, 3, 4, 4)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x, mean, std), want)
    before = _norm_consts.cache_info().hits
    mode = _HostReads()
    with mode:
        normalize(x, mean, std)
    assert _norm_consts.cache_info().hits == before + 1 and mode.reads == 0


def test_evaluate_reads_the_host_once_per_call_not_per_batch():
    """Evaluation keeps its sums on the device: the number of host reads does not grow with the
    number of batches (a per-batch ``.item()`` would be a GPU sync per batch). torch.bincount's
    read of its largest index happens inside its CUDA kernel launcher, unseen here: the confusion
    matrix uses ``index_add_`` instead, and its counts are checked against scikit-learn above."""
    from vitkit.eval.evaluate import evaluate

    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, in_channels=1, num_classes=4, dim=16, depth=1, num_heads=2))
    batches = [(torch.rand(5, 1, 8, 8), torch.randint(0, 4, (5,))) for _ in range(6)]
    reads = []
    for n in (2, 6):
        mode = _HostReads()
        with mode:
            r = evaluate(model, batches[:n], num_outputs=4, mean=[0.5], std=[0.5])
        reads.append(mode.reads)
        assert r["count"] == 5 * n
    assert reads[0] == reads[1], reads


def test_ema_with_fsdp_is_said_not_silently_dropped():
    """Under FSDP (sharded weights) the run has no EMA and says so; a single process asked for
    --strategy fsdp shards nothing and keeps its EMA."""
    from vitkit.train.build import build_ema
    from vitkit.train.ema import EMA

    model = ViT(ViTConfig(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, num_heads=2))
    cfg = TrainConfig(strategy="fsdp")
    said = []
    assert build_ema(cfg, model, sharded=True, log=said.append) is None
    assert len(said) == 1 and "no EMA under --strategy fsdp" in said[0]
    assert isinstance(build_ema(cfg, model, sharded=False, log=said.append), EMA) and len(said) == 1
    assert build_ema(cfg.replace(ema=False), model, sharded=True, log=said.append) is None and len(said) == 1
