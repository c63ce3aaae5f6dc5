"""vitkit bench: images/s or training-step time, against timm in the same run."""

from __future__ import annotations

HELP = "measure inference throughput or training-step time, compared with timm in the same run"
DESCRIPTION = (
    "Times vitkit and (when installed) the same architecture from timm with identical weights, "
    "warmed up and interleaved round by round, and reports medians and the vitkit/timm ratio. "
    "Inference reports images/s (higher is better); --train reports the time of one step of "
    "forward + cross-entropy + backward + AdamW (lower is better). On CUDA, MFU is reported too. "
    "fp32 CPU inference also times vitkit.infer.Predictor (--predictor) and, with --ort-int8, ONNX Runtime's "
    "dynamic int8 quantization of the exported model, in the same rounds; every ratio is against timm "
    "fp32 eager. --runtimes adds the bf16 runtimes a Predictor can run on: torch.compile (inductor, freezing) "
    "and OpenVINO, and the static int8 Predictor (NNCF + OpenVINO, calibrated on two real photos), built before "
    "timing (the build time is its own column). Rows: vitkit = the model's forward; "
    "vitkit-DTYPE = Predictor(model, DTYPE) (bf16: the hand-written walk; int8: dynamic); RUNTIME-bf16 = "
    "Predictor(model, 'bf16', backend=RUNTIME); static-int8 = Predictor(model, 'int8', calibration=...). Every "
    "row names the CPU (or GPU) it ran on."
)


def add_arguments(p) -> None:
    p.add_argument("name", nargs="?", default="vit_small_patch16_224",
                   help="preset name (see `vitkit models`), e.g. vit_base_patch16_224 or ViT-B/16")
    p.add_argument("--batch-size", type=int, nargs="+", default=[8],
                   help="batch size(s); several values run one benchmark each")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="compute dtype (bf16/fp16 through torch.autocast)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile both models before timing")
    p.add_argument("--train", action="store_true", help="time a training step instead of inference")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per model")
    p.add_argument("--runs", type=int, default=10, help="timed rounds per model (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-timm", action="store_true", help="do not run the timm comparison")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's input size")
    p.add_argument("--num-classes", type=int, default=None, help="override the number of classes")
    p.add_argument("--same-optimizer", action="store_true",
                   help="with --train: step both models with a plain torch.optim.AdamW (compares the models "
                        "alone); by default each uses its own library's AdamW factory, as its trainer does "
                        "(vitkit: fused kernel; timm: create_optimizer_v2)")
    p.add_argument("--predictor", nargs="*", choices=["fp32", "bf16", "int8"], default=["fp32", "bf16", "int8"],
                   help="fp32 CPU inference: also time Predictor(model, DTYPE) for these dtypes (none: give the flag "
                        "without values). CUDA inference with bf16 listed: also time Predictor(model, 'bf16') (bf16 "
                        "weights, no autocast; compiled with --compile) and timm's model cast to bf16 (row timm-bf16)")
    p.add_argument("--ort-int8", action="store_true",
                   help="fp32 CPU inference: also time ONNX Runtime's dynamic int8 quantization of the exported model "
                        "(the peer of --predictor int8; needs vitkit[onnx]; exporting takes a while)")
    p.add_argument("--runtimes", nargs="+", choices=["compile", "openvino", "int8"], default=[],
                   help="fp32 CPU inference: also time bf16 inference on these runtimes (compile, openvino) and static "
                        "int8 (int8: needs vitkit[int8] and a CPU with int8 units), built before timing (inductor "
                        "takes tens of seconds per model and shape); a runtime that cannot run here (not installed, "
                        "no C++ compiler, no native bf16 or int8 units) gets a row saying why")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")


def run(args) -> int:
    import time

    import torch

    from .. import cpu
    from ..bench.throughput import run_benchmark
    from ..output import json_text

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"image_size": args.image_size, "num_classes": args.num_classes}.items()
                 if v is not None}
    mode = "train step" if args.train else "inference"
    if not args.json:
        dev = args.device
        if dev.startswith("cuda") and torch.cuda.is_available():
            dev = torch.cuda.get_device_name(torch.device(args.device))
        else:
            dev = f"{dev}: {cpu.describe()}"
        print(f"# {args.name} {mode}, {args.dtype}, device {dev}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M %Z')}")
        print(f"{'impl':<14}{'batch':>6}{'median ms':>11}{'img/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'faults':>9}"
              f"{'build s':>9}   ratio vs timm   machine")
    for bs in args.batch_size:
        results = run_benchmark(args.name, batch_size=bs, dtype=args.dtype, device=args.device, train=args.train,
                                compile=args.compile, warmup=args.warmup, runs=args.runs,
                                compare_timm=not args.no_timm, progress=not args.json,
                                same_optimizer=args.same_optimizer,
                                predictor=tuple(args.predictor or ()), ort_int8=args.ort_int8,
                                runtimes=tuple(args.runtimes), **overrides)
        for r in results:
            if args.json:
                print(json_text(r.to_dict(), indent=None))
                continue
            if r.skipped:
                print(f"{r.impl:<14}{r.batch_size:>6}   not run: {r.skipped}   [{r.machine}]")
                continue
            mfu = f"{100 * r.mfu:6.1f}%" if r.mfu is not None else "     -"
            ratio = r.ratio_vs_timm
            tail = f"   {ratio:.3f}" if ratio is not None else "   -"
            if r.ratio_iqr:
                tail += f" (IQR {r.ratio_iqr[0]:.3f}-{r.ratio_iqr[1]:.3f})"
            opt = f"   [{r.optimizer}]" if r.optimizer else ""
            faults = f"{r.page_faults:>9.0f}" if r.page_faults is not None else "        -"
            note = f"   [{r.note}]" if r.note else ""
            build = f"{r.setup_s:>9.1f}" if r.setup_s is not None else "        -"
            print(f"{r.impl:<14}{r.batch_size:>6}{1000 * r.median_s:>11.2f}{r.images_per_s:>10.1f}"
                  f"{r.tflops:>9.3f}{mfu:>7}{faults}{build}{tail}   [{r.machine}]{opt}{note}")
    if not args.json:
        ref = f"timm {args.dtype} {'compiled' if args.compile else 'eager'}"  # every row's ratio: against this
        print(f"ratio = speed / {ref} speed (> 1: faster), median of per-round paired ratios; "
              "faults = median minor page faults per step (fresh 4 KiB pages the kernel had to zero); "
              "build s = a runtime's one-off compile / convert before timing, not in its speed")
    return 0
