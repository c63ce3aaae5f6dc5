"""bf16 inference on the CPU: ``vitkit.infer.Predictor(model, "bf16")`` (the hand-written walk) against the
runtimes made for the job, with the same weights, in paired rounds in one process (issue 21, item 3):

* ``predictor``: ``Predictor(model, "bf16", backend="eager")``: the hand-written walk (oneDNN on
  bf16 weights reordered once);
* ``compile``: ``Predictor(model, "bf16", backend="compile")``: ``torch.compile(backend="inductor",
  options={"freezing": True})`` of the model's own forward on the bf16 weights, under ``torch.no_grad()``;
* ``openvino``: ``Predictor(model, "bf16", backend="openvino")``: OpenVINO's CPU plugin
  (``INFERENCE_PRECISION_HINT=bf16``, torch's thread count) on the model's own forward converted by
  ``openvino.convert_model`` (when ``openvino`` is installed);
* ``openvino-onnx`` (asked for with ``--runtimes``): the same plugin on vitkit's ONNX export
  (``vitkit.interop.graph.export_onnx``), as issue 21 measured it.

Each round times every contender once (repeating its forward for ``--min-seconds``) in a rotating order; the ratio of a
runtime is the median over rounds of t_predictor / t_runtime (> 1: the runtime is faster), with the
range. Each contender's construction and first call (the build of a backend, per model and shape;
OpenVINO's graph takes any batch, so it is built once per model) are timed as its one-off cost.

    python benchmarks/bf16_runtimes.py                                  # ViT-S/16, ViT-B/16 x batch 1, 8, 32
    python benchmarks/bf16_runtimes.py --models vit_small_patch16_224 --batches 8 --rounds 3
    python benchmarks/bf16_runtimes.py --quick                          # a tiny model: checks it runs
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def contenders(model, x, workdir: Path, which: list[str], built: dict) -> tuple[dict, dict, dict]:
    """({name: step()}, {name: one-off seconds}, {name: what runs}) for the runtimes in ``which``;
    ``built`` keeps what serves every batch of one model (OpenVINO's graph of the ONNX export)."""
    from vitkit.infer import Predictor

    steps, setup, notes = {}, {}, {}
    for name in ["eager"] + [w for w in which if w in ("compile", "openvino")]:
        t0 = time.perf_counter()
        p = Predictor(model, "bf16", backend=name)
        with torch.no_grad():
            p(x)  # a backend builds on its first call of a shape
        key = "predictor" if name == "eager" else name
        setup[key] = time.perf_counter() - t0
        steps[key] = functools.partial(p, x)
        notes[key] = f"Predictor {p.dtype} backend={name}: " + "; ".join(p.notes)
    if "openvino-onnx" in which:
        import openvino as ov

        from vitkit.interop.graph import export_onnx

        t0 = time.perf_counter()
        if "openvino-onnx" not in built:
            path = export_onnx(model, workdir / f"m{id(model)}.onnx")
            core = ov.Core()
            built["openvino-onnx"] = core.compile_model(core.read_model(str(path)), "CPU", {
                "INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        req = built["openvino-onnx"].create_infer_request()
        xn = x.numpy()
        req.infer({0: xn})
        setup["openvino-onnx"] = time.perf_counter() - t0
        steps["openvino-onnx"] = functools.partial(req.infer, {0: xn})
        notes["openvino-onnx"] = f"OpenVINO {ov.__version__} CPU, bf16 hint, of vitkit's ONNX export"
    return steps, setup, notes


def paired(steps: dict, rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per forward, one list per contender, from ``rounds`` rounds in a rotating order."""
    names = list(steps)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up
            steps[n]()
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                for _ in range(iters):
                    steps[n]()
                times[n].append((time.perf_counter() - t0) / iters)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--runtimes", default="compile,openvino", help="beside the Predictor")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.5, help="each timed call repeats forwards to last this")
    ap.add_argument("--threads", type=int, default=None, help="torch's (and OpenVINO's) threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, batch 2, 2 rounds")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import vitkit
    from vitkit import cpu

    which = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if args.quick:
        models = {"tiny": dict(name="vit_small_patch16_224", dim=32, depth=1, num_heads=2, mlp_dim=64,
                               image_size=32, patch_size=16)}
        batches, args.rounds = [2], 2
    else:
        models = {m: dict(name=m) for m in args.models.split(",")}
        batches = [int(b) for b in args.batches.split(",")]
    res = {"cpu": cpu.describe(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    print(f"# {res['cpu']}, torch {res['torch']}, {res['threads']} threads, {res['date']}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        for label, kw in models.items():
            torch.manual_seed(0)
            kw = dict(kw)
            model = vitkit.create_model(kw.pop("name"), **kw).eval()
            built: dict = {}
            for B in batches:
                x = torch.randn(B, model.config.in_channels, *model.config.image_hw)
                steps, setup, notes = contenders(model, x, Path(d), which, built)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    steps["predictor"]()
                    one = time.perf_counter() - t0
                iters = max(1, round(args.min_seconds / max(one, 1e-4)))
                times = paired(steps, args.rounds, iters)
                row = {"model": label, "batch": B, "rounds": args.rounds, "iters": iters, "setup_s": setup,
                       "notes": notes, "images_per_s": {n: B / statistics.median(t) for n, t in times.items()},
                       "vs_predictor": {}}
                for n in times:
                    if n == "predictor":
                        continue
                    r = [a / b for a, b in zip(times["predictor"], times[n])]
                    row["vs_predictor"][n] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
                res["rows"].append(row)
                ips = ", ".join(f"{n} {v:.1f}" for n, v in row["images_per_s"].items())
                rat = ", ".join(f"{n} x{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"
                                for n, v in row["vs_predictor"].items())
                st = ", ".join(f"{n} {v:.1f}s" for n, v in setup.items())
                print(f"{label} b{B}: img/s {ips} | runtime/predictor speed {rat} | setup {st}", flush=True)
                del steps
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
