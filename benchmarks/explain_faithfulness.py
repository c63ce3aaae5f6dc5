"""Faithfulness of the explore page's maps on the digits test set: deletion curves and their area.

For every test image, the predicted class c and three orders of the patches:

* ``attribution``: the readout row of the Chefer et al. (2021) relevance R_L for class c
  (``vitkit.viz.attribution``, what explore.html's ``attribution`` mode shows at the last layer);
* ``rollout``: the readout row of attention rollout (``vitkit.viz.rollout``, the report's map);
* ``random``: a seeded random permutation (``--random-orders`` of them per image, averaged).

Patches are deleted most-relevant first (their pixels set to the training mean, i.e. 0 after
normalisation), k = 0..N, and the softmax probability of c is recorded after each step. The
area under that curve (trapezoid over the deleted fraction in [0, 1]) is lower when the order
finds the evidence the model uses: a faithful map deletes the probability fastest.

The model: ``--model RUN`` (a run or model directory), or trained here with the default digits
recipe (``vitkit.train.loop.train(TrainConfig())``: the defaults of ``vitkit train``;
``--epochs`` to shorten it for a sanity run).

    python benchmarks/explain_faithfulness.py                          # trains (100 epochs), ~2-3 min
    python benchmarks/explain_faithfulness.py --model runs/demo        # an existing run
    python benchmarks/explain_faithfulness.py --epochs 3 --limit 40    # sanity run, ~20 s
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def load_or_train(args):
    import vitkit
    from vitkit.train.config import TrainConfig
    from vitkit.train.loop import train

    if args.model:
        return vitkit.from_pretrained(args.model), f"--model {args.model}"
    out = Path(args.out or tempfile.mkdtemp(prefix="vitkit-faith-")) / "run"
    overrides = {"out": str(out), "threads": args.threads, "progress": False}
    if args.epochs:
        overrides["epochs"] = args.epochs
    cfg = TrainConfig(**overrides)
    summary = train(cfg, log=lambda *a, **k: None)
    model = vitkit.from_pretrained(str(out))
    how = (f"trained here: default digits recipe, {cfg.epochs} epochs, test accuracy "
           f"{summary['test_accuracy']:.4f} ({out})")
    return model, how


def deletion_auc(model, x: torch.Tensor, cls: int, order: np.ndarray, patch_hw) -> tuple[float, np.ndarray]:
    """x (1, C, H, W) normalised; order: patch indices, first deleted first. Returns (AUC, curve (N+1,))."""
    gh, gw = model.grid_size
    ph, pw = patch_hw
    N = gh * gw
    batch = x.repeat(N + 1, 1, 1, 1)
    for k in range(1, N + 1):
        for p in order[:k]:
            i, j = divmod(int(p), gw)
            batch[k, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = 0.0  # the training mean
    with torch.no_grad():
        probs = model(batch).softmax(-1)[:, cls].numpy()
    frac = np.arange(N + 1) / N
    return float(np.trapezoid(probs, frac)), probs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="run or model directory (default: train one with the digits recipe)")
    ap.add_argument("--epochs", type=int, default=0, help="training epochs (0 = the recipe's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared machine)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N test images (0 = all)")
    ap.add_argument("--random-orders", type=int, default=5, help="random deletion orders per image")
    ap.add_argument("--out", default=None, help="where to train (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vitkit.eval.evaluate import normalize
    from vitkit.train.config import TrainConfig
    from vitkit.viz import readout_query, rollout
    from vitkit.viz.attention import _query_rows
    from vitkit.viz.attribution import attention_with_relevance

    t0 = time.time()
    model, how = load_or_train(args)
    model.eval()
    c = model.config
    from vitkit.data.datasets import build_datasets

    data = build_datasets(TrainConfig(dataset="digits"))
    n = len(data.test) if not args.limit else min(args.limit, len(data.test))
    x, y = data.test.get_batch(list(range(n)))
    pre = model.preprocess_cfg or {}
    x = normalize(x, pre.get("mean", data.mean), pre.get("std", data.std))
    R, q = c.num_prefix_tokens, readout_query(model)
    rng = np.random.default_rng(0)
    aucs = {"attribution": [], "rollout": [], "random": []}
    curves = {k: [] for k in aucs}
    correct = 0
    for i in range(n):
        xi = x[i:i + 1]
        logits, A, classes, rel = attention_with_relevance(model, xi, topk=1)
        cls = int(classes[0])
        correct += int(cls == int(y[i]))
        attr = _query_rows(rel[0, -1], q, R)[R:]
        roll = _query_rows(rollout([a[None] for a in A])[0], q, R)[R:]
        for name, score in (("attribution", attr), ("rollout", roll)):
            auc, curve = deletion_auc(model, xi, cls, np.argsort(-score, kind="stable"), c.patch_hw)
            aucs[name].append(auc)
            curves[name].append(curve)
        rand = [deletion_auc(model, xi, cls, rng.permutation(c.num_patches), c.patch_hw) for _ in range(args.random_orders)]
        aucs["random"].append(float(np.mean([a for a, _ in rand])))
        curves["random"].append(np.mean([cv for _, cv in rand], axis=0))
    res = {"model": how, "images": n, "accuracy_on_these": correct / n, "patches": c.num_patches,
           "seconds": round(time.time() - t0, 1)}
    for k, v in aucs.items():
        v = np.asarray(v)
        res[f"auc_{k}"] = {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0}
        res[f"curve_{k}"] = [round(float(p), 4) for p in np.mean(curves[k], axis=0)]
    a, r, ro = (np.asarray(aucs[k]) for k in ("attribution", "random", "rollout"))
    res["attribution_below_random"] = float((a < r).mean())
    res["attribution_below_rollout"] = float((a < ro).mean())
    res["ratio_attribution_to_random"] = float(a.mean() / r.mean())
    res["ratio_attribution_to_rollout"] = float(a.mean() / ro.mean())
    print(f"model: {how}")
    print(f"{n} digits test images, {c.num_patches} patches, {res['seconds']} s")
    print("deletion AUC (mean +- s.e.m., lower = more faithful):")
    for k in aucs:
        print(f"  {k:12s} {res[f'auc_{k}']['mean']:.4f} +- {res[f'auc_{k}']['sem']:.4f}   "
              f"curve at 0/25/50/75/100%: {[res[f'curve_{k}'][round(f * c.num_patches)] for f in (0, .25, .5, .75, 1)]}")
    print(f"attribution / random AUC {res['ratio_attribution_to_random']:.3f}; attribution / rollout "
          f"{res['ratio_attribution_to_rollout']:.3f}; attribution lower than random on "
          f"{res['attribution_below_random']:.1%} of images, than rollout on {res['attribution_below_rollout']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
