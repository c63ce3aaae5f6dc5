"""``Predictor``: fast inference beside the model. See :mod:`vitkit.infer`."""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import torch
from torch import nn

from .. import cpu
from ..errors import ConfigError, InputError
from ..model.naflex import NaFlexBatch
from ..model.text import TextTransformer
from . import backends, engine, int8

log = logging.getLogger("vitkit.infer")

DTYPES = ("fp32", "bf16", "int8")


def bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively (:func:`vitkit.cpu.bf16_native`; honours
    ``VITKIT_CPU_FEATURES_OFF``). Without it oneDNN emulates bf16, slower than fp32, so the
    Predictor runs fp32 and says so."""
    return cpu.bf16_native()


def _hooked(modules: list[nn.Module]) -> bool:
    """A forward hook on a module the engine replaces would not fire (or would see a reused
    buffer); such a model runs its own forward instead. Instance hook dicts only."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def model_output(model: nn.Module, x: torch.Tensor, output: str = "logits",
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own stages for ``output`` (what the engine reproduces): "logits" ``model(x)``,
    "pooled" ``forward_head(forward_features(x), pre_logits=True)``, "tokens"
    ``forward_features(x)``. A text tower: the same stages of ids ``x`` with ``attention_mask``."""
    if isinstance(model, TextTransformer):
        if output == "logits":
            return model(x, attention_mask)
        tokens = model.forward_features(x, attention_mask)
        return tokens if output == "tokens" else model.forward_head(tokens, x, pre_logits=True)
    if output == "logits":
        return model(x)
    tokens = model.forward_features(x)
    if output == "tokens":
        return tokens
    return model.forward_head(tokens, pre_logits=True, valid=x.mask if isinstance(x, NaFlexBatch) else None)


class Predictor:
    """Fast inference for a vitkit model: ``Predictor(model, dtype)(x)`` returns what
    ``model(x)`` returns (logits (B, K), or pooled features (B, D) when num_classes == 0), as
    float32, without autograd; ``output=`` picks another stage.

    A text tower (:class:`~vitkit.model.text.TextTransformer`) runs through the same engine:
    ``Predictor(text, dtype)(ids, attention_mask=None)`` is ``text(ids, attention_mask)``, the
    (B, E) text embedding, its causal and padding masks applied in every block.

    Args:
        model: a :class:`vitkit.ViT` or a text tower (any nn.Module works through its own forward).
        dtype: "fp32" (default): the model's weights in fp32; on x86 CPUs a walk over the
            model's parts with oneDNN matmuls on weights reordered once (GELU and residual
            adds fused), checked against ``model(x)`` within 1e-5 at construction. "bf16": a
            bf16 copy of the weights (on x86 reordered once for oneDNN, as fp32) and bf16
            activations, on CPUs with native bf16 (else fp32, with a logged note) and on GPUs.
            "int8" (CPU) with ``calibration``: static int8 on the CPU's int8 units (NNCF's
            post-training quantization run by OpenVINO, :mod:`vitkit.infer.int8`; the ``int8``
            extra), or, where the CPU has no int8 units or the extra is missing, bf16 where native
            (else fp32), with a note; without ``calibration``: dynamic int8 quantization of every
            Linear in the blocks (slower than bf16 on CPUs with native bf16, docs/inference.md).
            bf16 and int8 are approximations: measure their top-1 agreement with
            :func:`vitkit.infer.agreement`.
        calibration: int8 only: a few (~64) real images as the model takes them, a (N, C, H, W)
            float batch of preprocessed images or a sequence of image file paths (preprocessed as
            ``vitkit predict`` does); the quantizer reads the activations' ranges from them. The
            quantized graph is built at construction and kept per model, output, calibration and
            image size (``notes`` say so and the build time).
        compile: True: ``torch.compile`` the model's plain forward (the buffer-reusing walk
            is not used: the compiler plans memory itself). "auto": compile on CUDA, not on
            the CPU (measured: on this project's CPU compiling does not pay, see
            docs/inference.md). False (default): eager.
        exact: fp32 only: the buffer-reusing walk with the model's own kernels (``addmm``),
            bit-identical to ``model(x)`` through the full blocks; slower than the default
            oneDNN walk on x86 (docs/inference.md).
        backend: what runs a bf16 Predictor on the CPU: "auto" (default) the fastest of the
            hand-written walk, ``torch.compile`` (inductor, freezing) of the model's own forward
            and OpenVINO (when installed), measured per input shape once the walk has run that
            shape for 10 s, and kept per model (:mod:`vitkit.infer.backends`; the choice is in
            ``notes``); "eager" the walk; "compile" / "openvino" that runtime (the walk, with a
            note, where it cannot run). Other dtypes and devices take "auto" / "eager" only.
        verify: at construction, run one random image through the engine and the model's own
            forward; any difference beyond float rounding (1e-5 of the largest output)
            switches to the model's forward with a warning (a guard against layouts the
            engine misreads).
        output: what to return: "logits" (default) ``model(x)``; "pooled" the pre-logits
            features ``forward_head(forward_features(x), pre_logits=True)`` (B, D) (the
            embedding vitkit.features reads); "tokens" ``forward_features(x)`` (B, R+N, D).
            With ``exact=True`` each is bit-identical to those stage calls ("pooled" then runs
            every token through the last block, as ``forward_features``; otherwise a class-token
            head's tokens only, as ``model(x)``).

    ``path`` says what runs ("engine" | "model" | "compiled" | "int8"), ``notes`` why. fp32 reads the
    model's weights at each call (later weight updates are seen); bf16 and int8 copy them at
    construction. The structure (parts, hooks) is read at construction; an fp32 Predictor also
    notices forward hooks added later and then runs the model's forward.
    """

    def __init__(self, model: nn.Module, dtype: str = "fp32", compile: bool | str = False,
                 exact: bool = False, verify: bool = True, output: str = "logits", backend: str = "auto",
                 calibration: torch.Tensor | list | tuple | None = None) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if output not in engine.OUTPUTS:
            raise ConfigError(f"output must be one of {list(engine.OUTPUTS)}, got {output!r}")
        if exact and dtype != "fp32":
            raise ConfigError(f"exact=True is the bit-identical fp32 walk; dtype {dtype!r} is an approximation "
                              "(use dtype='fp32' with exact=True, or drop exact)")
        if backend not in backends.BACKENDS:
            raise ConfigError(f"backend must be one of {list(backends.BACKENDS)}, got {backend!r}")
        if backend in ("compile", "openvino") and (dtype != "bf16" or compile):
            raise ConfigError(f"backend {backend!r} runs a bf16 Predictor on the CPU; got dtype {dtype!r}"
                              + (" with compile=True" if compile else ""))
        if compile not in (True, False, "auto"):
            raise ConfigError(f"compile must be True, False or 'auto', got {compile!r}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Predictor expects a torch nn.Module, got {type(model).__name__}")
        if calibration is not None and dtype != "int8":
            raise ConfigError(f"calibration is for dtype 'int8' (static quantization); dtype {dtype!r} takes none")
        if calibration is not None and isinstance(model, TextTransformer):
            raise ConfigError("calibration images are for an image model; a text tower's int8 is dynamic "
                              "quantization (drop calibration)")
        self.model = model
        self.text = isinstance(model, TextTransformer)
        self.output = output
        self.exact = exact
        self.notes: list[str] = []
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        on_cpu = self.device.type == "cpu"
        if compile == "auto":
            compile = not on_cpu
        if dtype == "bf16" and on_cpu and not bf16_native():
            self._note("this CPU has no native bf16 (avx512_bf16 / amx_bf16): running fp32 instead")
            dtype = "fp32"
        if dtype == "int8" and not on_cpu:
            raise ConfigError(f"dtype 'int8' runs on the CPU only; the model is on {self.device}")
        if dtype == "int8" and compile:
            raise ConfigError("compile is not supported with dtype 'int8'")
        self._int8: int8.Quantized | None = None
        if dtype == "int8" and calibration is not None:
            calib = int8.calibration_batch(calibration, model)  # checked on every CPU
            why = int8.unavailable()
            if why:
                dtype = "bf16" if bf16_native() else "fp32"
                self._note(f"static int8 unavailable ({why}): running {dtype} instead")
            else:
                self._int8 = int8.quantized_for(model, output, lambda m, x, mask: model_output(m, x, output, mask),
                                                 calib, self.notes)
                self.dtype, self.compute_dtype, self._net, self._plan, self._chooser = (
                    "int8", torch.float32, model, None, None)
                self._compiled, self.path = None, "int8"
                return
        self.dtype = dtype
        self.compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        if dtype == "bf16" and on_cpu and backend != "eager" and not compile and not _hooked(list(model.modules())):
            # the bf16 copy and walk an earlier Predictor of this model made and checked (zero-shot and
            # features build one per call; copying and checking ViT-B/16 took 2.6 s of each call)
            ch = backends.cached_chooser(model, backend, output, self.notes)
            if ch is not None:
                self._net, self._plan, self._chooser, self._compiled, self.path = ch.net, ch.plan, ch, None, "engine"
                return
        # What runs: the model itself (fp32, int8) or a bf16 copy of it.
        self._net = model if dtype != "bf16" else copy.deepcopy(model).to(torch.bfloat16)
        self._plan: engine.Plan | None = None
        self._chooser: backends.Chooser | None = None  # bf16 on the CPU: which runtime runs each input shape
        self._compiled = None
        self.path = "model"
        if compile:
            self._compiled = torch.compile(self._net if output == "logits" else self._reference)
            self.path = "compiled"
            self._note("torch.compile of the model's forward (first call compiles)")
            return
        if not on_cpu:
            self._note(f"the buffer-reusing engine is for the CPU; running the model's forward on {self.device}")
            return
        linear = "int8" if dtype == "int8" else "dense"
        # oneDNN on weights reordered once: fp32 (unless exact) and bf16 (1.07-1.08x over bf16 addmm,
        # measured; docs/inference.md)
        if dtype in ("fp32", "bf16") and not (dtype == "fp32" and exact) and engine.packed_available():
            linear = "packed"
        plan, why = engine.plan_for(self._net, linear)
        if plan is not None and _hooked(plan.modules):
            plan, why = None, "forward hooks are registered on the blocks or the final norm"
        if plan is not None and verify:
            why = self._verify(plan if dtype == "fp32" else None)
            if why:
                plan = None
        if plan is None:
            if dtype == "int8":
                self._note(f"int8 needs the engine, which cannot run this model ({why}): running fp32 instead")
                self.dtype, self.compute_dtype = "fp32", torch.float32
            else:
                self._note(f"engine off ({why}): running the model's own forward")
            return
        self._plan = plan
        self.path = "engine"
        if self.dtype == "int8" and not self.text:
            self.notes.append("int8 without calibration: dynamic quantization of the Linears (slower than bf16 on "
                              "CPUs with native bf16); pass calibration= (a few real images) for static int8")
        if self.dtype == "bf16" and backend != "eager":
            # the walk and the model's own stages, holding the bf16 copy only (backends.chooser_for)
            text, out, net = self.text, self.output, self._net
            q = None if text else self._last_queries(plan)
            eager = ((lambda x, mask: engine.run_text(plan, x, out, mask)) if text
                     else (lambda x, mask: engine.run(plan, x, out, q)))
            trim = net.trim if text and out != "tokens" else None  # as engine.run_text
            self._chooser = backends.chooser_for(model, backend, output, lambda: backends.Chooser(
                backend, net, lambda m, x, mask: model_output(m, x, out, mask), eager, text, trim,
                plan=plan if verify else None), self.notes)  # an unchecked plan is not reused

    def _reference(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return model_output(self._net, x, self.output, attention_mask)

    def _last_queries(self, plan: engine.Plan) -> int | None:
        """As ``model(x)``: a class-token head's tokens only from the last block; "tokens", and
        the exact walk of "pooled", run every token, as ``forward_features`` (bit-identity
        with the stage calls)."""
        if self.output == "tokens" or (self.output == "pooled" and self.exact):
            return None
        return plan.model.head_queries()

    def _run(self, plan: engine.Plan, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.text:
            return engine.run_text(plan, x, self.output, attention_mask)
        return engine.run(plan, x, self.output, self._last_queries(plan))

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        log.warning("Predictor: %s", msg)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random input and its attention mask: images (2, C, H, W); a text tower two rows of
        ids, the second with padding (a mask of zeros on its last quarter), so the check covers
        the mask."""
        g = torch.Generator().manual_seed(0)
        if self.text:
            c = self.model.config
            L = c.context_length
            ids = torch.randint(0, c.vocab_size, (2, L), generator=g)
            mask = torch.ones(2, L, dtype=torch.long)
            mask[1, L - L // 4:] = 0
            return ids.to(self.device), mask.to(self.device)
        c = getattr(self.model, "config", None)
        C, (H, W) = (c.in_channels, c.image_hw) if c is not None else (3, (224, 224))
        return torch.randn(2, C, H, W, generator=g).to(self.device), None

    @torch.no_grad()
    def _verify(self, plan: engine.Plan | None) -> str:
        """'' when ``plan`` (an fp32 walk of the original model; None: the exact walk) equals the
        model's forward on a random batch, within float rounding."""
        if plan is None:
            plan, why = engine.plan_for(self.model, "dense")
            if plan is None:
                return why
        if self.model.training:
            return ""  # calls then take the model's path anyway (train-mode forward)
        x, mask = self._sample()
        try:
            want = model_output(self.model, x, self.output, mask)
        except Exception as e:
            return f"the model's own forward failed on a random {tuple(x.shape)} batch ({type(e).__name__}: {e})"
        if isinstance(want, torch.Tensor) and not bool(torch.isfinite(want).all()):
            # nothing to compare against, and not the engine's fault: the model itself computes NaN / inf
            return ("the model's own forward outputs NaN or inf on a random input, so the engine cannot be "
                    "checked against it")
        try:
            got = self._run(plan, x, mask)
        except Exception as e:  # the engine misread the layout: say so, run the model instead
            return f"the engine failed on this model ({type(e).__name__}: {e})"
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            return f"the engine's output shape {tuple(got.shape)} differs from the model's"
        err = (want - got).abs().max().item()
        tol = 1e-5 * max(1.0, want.abs().max().item())
        if not err <= tol:
            msg = f"the engine differs from model(x) by {err:.3g} (> {tol:.3g})"
            log.warning("Predictor: %s: please report this layout", msg)
            return msg
        return ""

    # ------------------------------------------------------------------ calling
    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) float batch -> ``model(x)`` or the chosen ``output`` (float32, no autograd).
        A text tower: (B, L) integer ids [and their (B, L) ``attention_mask``, 1 = token, 0 =
        padding] -> ``model(ids, attention_mask)``."""
        got = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        if self.text:
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.is_floating_point():
                raise InputError(f"a text Predictor expects integer token ids (B, L), got {got}; tokenize texts first")
            if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                               or tuple(attention_mask.shape) != tuple(x.shape)):
                m = attention_mask
                raise InputError(f"attention_mask must be a tensor of the ids' shape {tuple(x.shape)}, got "
                                 f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
            x = x.to(self.device)
            args = (x, attention_mask)
        elif isinstance(x, NaFlexBatch):  # images at their own aspect ratio: the model's own forward
            x = x.to(self.device, self.compute_dtype, non_blocking=True)
            with torch.no_grad():
                out = self._compiled(x) if self._compiled is not None else self._reference(x)
            return out.float()
        else:
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
                raise InputError(f"Predictor expects a float image batch (B, C, H, W), got {got}")
            if attention_mask is not None:
                raise InputError("attention_mask is for a text tower's ids; this Predictor runs an image model")
            x = x.to(self.device, self.compute_dtype, non_blocking=True)
            args = (x,)
        with torch.no_grad():
            if self._int8 is not None:
                out = self._int8(x)
            elif self._compiled is not None:
                out = self._compiled(*args)
            elif (self._plan is None or self._net.training
                  or (self._net is self.model and _hooked(self._plan.modules))):
                out = self._reference(x, attention_mask)
            else:
                out = (self._chooser or functools.partial(self._run, self._plan))(x, attention_mask)
        return out.float() if isinstance(out, torch.Tensor) else out

    def to(self, *a: Any, **k: Any) -> Predictor:  # pragma: no cover - guard
        raise ConfigError("move the model, then build a new Predictor (bf16/int8 weights are copies)")

    def __repr__(self) -> str:
        return f"Predictor(dtype={self.dtype!r}, output={self.output!r}, path={self.path!r}, device={self.device})"
