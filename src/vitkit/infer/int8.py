"""Static int8 for a :class:`~vitkit.infer.Predictor` on the CPU's int8 units (AMX-INT8, AVX-512-VNNI,
AVX-VNNI): the model's own forward converted to OpenVINO (:func:`vitkit.infer.backends.openvino_graph`),
quantized after training by NNCF (``nncf.quantize``, the transformer preset: SmoothQuant, int8
weights per output channel, int8 activations with ranges calibrated on the caller's real images),
and run by OpenVINO's CPU plugin, which runs what stays unquantized (softmax, norms) in bf16 where
the CPU has it natively, else in fp32. The optional extra ``vitkit[int8]`` (openvino and nncf).

Why this quantizer (measured on the project's AMD EPYC, AVX-512-VNNI, threads 1, ViT-S/16 batch 8,
benchmarks/int8.py): the NNCF graph ran 1.94x the bf16 walk and 1.6x OpenVINO's bf16 of the same
graph; ONNX Runtime's static QDQ quantizer (``quantize_static``) on vitkit's ONNX export ran 0.90x
OpenVINO bf16 in ONNX Runtime and 0.84x in OpenVINO; torch 2.14 no longer ships PT2E quantization
(``torch.ao.quantization.quantizer`` moved to torchao). The dynamic quantization that
``Predictor(model, "int8")`` runs without calibration ran 0.49x bf16 on an Intel AMX machine.

Built once per model, output, calibration and image size (:func:`quantized_for`, a weak cache as
:func:`vitkit.infer.backends.chooser_for`): a Predictor built again on the same model and images
reuses the quantized graph.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu
from ..errors import InputError
from .backends import kept, openvino_compile, openvino_graph

log = logging.getLogger("vitkit.infer")

UNITS = ("amx_int8", "avx512_vnni", "avx_vnni")  # the CPU flags of int8 dot-product units
CALIBRATION_IMAGES = 64  # what the CLI reads by default: on DINOv2-S/14, 16 images gave 98.4% probe agreement, 64 gave 100%


def unavailable() -> str:
    """'' when static int8 can run here, else why not (no int8 units, switched off by
    ``VITKIT_CPU_FEATURES_OFF``, or openvino / nncf not installed)."""
    if not (cpu.is_x86() and any(cpu.has(f) for f in UNITS)):
        return "this CPU has no int8 dot-product units (AMX-INT8, AVX-512-VNNI or AVX-VNNI)"
    missing = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed (pip install 'vitkit[int8]')"
    return ""


def load_images(paths: Sequence[str | os.PathLike], model: nn.Module, limit: int | None = None,
                skip_unreadable: bool = False) -> torch.Tensor:
    """Image files -> (N, C, H, W) float, through the model's own evaluation preprocessing (what
    ``vitkit predict`` feeds it). ``limit``: the first that many readable images. An unreadable file
    is an InputError, or skipped with ``skip_unreadable``."""
    from ..data.image import load_image
    from ..data.transforms import eval_transform
    from ..preprocess import Preprocess

    transform = eval_transform(Preprocess.of(model))
    mode = "L" if model.config.in_channels == 1 else "RGB"
    xs = []
    for p in paths:
        if limit is not None and len(xs) >= limit:
            break
        try:
            xs.append(transform(load_image(p, mode=mode)))
        except (InputError, OSError, ValueError) as e:
            if not skip_unreadable:
                raise InputError(f"calibration image {p}: {e}") from e
    if not xs:
        raise InputError(f"no readable calibration image among {len(paths)} file(s)")
    return torch.stack(xs)


def calibration_batch(calibration: torch.Tensor | Sequence[str | os.PathLike], model: nn.Module) -> torch.Tensor:
    """The (N, C, H, W) float32 calibration images from what the caller passed: a batch of
    preprocessed real images as the model takes them, or a sequence of image file paths
    (preprocessed as :func:`load_images`)."""
    want = "a (N, C, H, W) float batch of preprocessed real images, or a list of image file paths"
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 4 or not calibration.is_floating_point() or calibration.shape[0] == 0:
            raise InputError(f"calibration must be {want}; got a tensor of shape {tuple(calibration.shape)} "
                             f"{calibration.dtype}")
        x = calibration.detach().float().cpu()
    elif (isinstance(calibration, Sequence) and not isinstance(calibration, (str, bytes)) and calibration
          and all(isinstance(p, (str, os.PathLike)) for p in calibration)):
        x = load_images(calibration, model)
    else:
        got = "an empty sequence" if isinstance(calibration, Sequence) and not calibration else type(calibration).__name__
        raise InputError(f"calibration must be {want}; got {got}")
    C = getattr(getattr(model, "config", None), "in_channels", x.shape[1])
    if x.shape[1] != C:
        raise InputError(f"calibration images have {x.shape[1]} channels, the model takes {C}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("calibration images hold NaN or inf")
    return x.contiguous()


Stages = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class Quantized:
    """The int8 runtime of one model's output, per image size: the model's forward (``stages`` on
    ``net``, an fp32 copy, never the original model: the key of :func:`quantized_for`'s weak
    cache) converted and quantized once per (C, H, W) on ``calib`` (resized to that size when
    the input's differs). Any batch size runs on one graph."""

    def __init__(self, net: nn.Module, stages: Stages, calib: torch.Tensor) -> None:
        self.net, self.stages, self.calib = net, stages, calib
        self.runs: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.said: list[str] = []  # how each size was built; the latest Predictor's notes hear it too
        self.notes: list[str] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape[1:])
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = self._build(key)
        return run(x)

    def _build(self, chw: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
        import nncf

        calib = self.calib
        if tuple(calib.shape[1:]) != chw:  # a dynamic-size model called at another size
            calib = F.interpolate(calib, size=chw[1:], mode="bilinear", antialias=True, align_corners=False)
        t0 = time.perf_counter()
        graph, _ = openvino_graph(self.net, self.stages, calib[:1])
        # The blocks' matmuls only (nearly all the work): quantized, the head's (B, D) matmul broke batches
        # > 1 (nncf 3.4; a mean-pooled digits model agreed 99.7% with fp32 at batch 1, 59.6% at batch 64).
        outside = [op.get_friendly_name() for op in graph.get_ops()
                   if op.get_type_name() == "MatMul" and ".blocks." not in op.get_friendly_name()]
        # NNCF writes its progress bars and its log to stdout (predict --json's): both kept off it
        from nncf.common.logging import nncf_logger

        level = nncf_logger.level
        nncf_logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                q = nncf.quantize(graph, nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))]),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib),
                                  ignored_scope=nncf.IgnoredScope(names=outside, validate=False))
        finally:
            nncf_logger.setLevel(level)
        # what stays unquantized (softmax, norms, the residual adds) in bf16 where the CPU has it natively
        rest = "bf16" if cpu.bf16_native() else "f32"
        compiled = openvino_compile(q, rest)
        msg = (f"int8 for input {'x'.join(map(str, chw))}: NNCF static quantization calibrated on {len(calib)} "
               f"image(s), OpenVINO on the CPU's int8 units ({rest} elsewhere), built in "
               f"{time.perf_counter() - t0:.1f} s")
        self.said.append(msg)
        self.notes.append(msg)
        log.info("Predictor: %s", msg)
        return lambda x: torch.from_numpy(compiled(x.float().contiguous().numpy())[0])


# model -> {(weights, output, calibration digest): Quantized} (backends.kept)
_QUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def quantized_for(model: nn.Module, output: str, stages: Stages, calib: torch.Tensor, notes: list[str]) -> Quantized:
    """The :class:`Quantized` runtime of ``model``'s ``output`` calibrated on ``calib``, made the first
    time and kept while the model's weights are as they are now (:func:`vitkit.infer.backends.kept`) and
    the calibration images are the same
    (their bytes' digest); its image size is built now, so a failure shows at construction. Its
    notes so far, and those to come, go to ``notes`` (the new Predictor's)."""
    digest = hashlib.sha1(calib.numpy().tobytes()).hexdigest() + str(tuple(calib.shape))

    def make() -> Quantized:
        q = Quantized(copy.deepcopy(model).float().eval(), stages, calib)
        q(calib[:1])  # builds the calibration's image size
        return q

    q = kept(_QUANTIZED, model, (output, digest), make)
    notes.extend(q.said)
    q.notes = notes
    return q
