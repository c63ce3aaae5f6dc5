"""The CPU forward that :class:`~vitkit.infer.Predictor` runs, built beside the model from the
model's own parts: one walk over the blocks with pluggable matmuls. One module (over 400 lines)
because the plan, the matmul kinds and the one block function are read together.

Why: the default CPU allocator hands large tensors back to the OS when they are freed, so every
fresh activation of a plain forward costs page faults (one per 4 KiB, 170k+ per ViT-S/16 forward
at batch 32). Writing each block's matmuls into a few buffers reused by every block faults once
per buffer instead of once per layer (~10x fewer faults, 1.07-1.25x over timm measured before
this moved out of the model). Same kernels in the same order as the model's forward: the fp32
output is bit-identical to ``model(x)`` for the full blocks (tested).

Norms: LayerNorm (into buffers) or RMSNorm (its own call); MLP: fc1-act-fc2 or the packed
SwiGLU. What it walks: ``model.embed`` (patch embedding, prefix tokens, position embedding,
``norm_pre``: the model's own code), then the model's own loop (``model.run_blocks``) with
:func:`block` in place of each ``Block``: ``norm1``, ``attn.qkv``, SDPA, ``attn.proj``,
``ls1``, ``norm2``, ``mlp.fc1``, ``mlp.act``, ``mlp.fc2``, ``ls2`` (pre- or post-norm), then
``model.norm`` and ``model.forward_head`` (pooling and head: the model's own code). With
class-token pooling the last block computes the head's tokens only (keys and values still come
from every token), as the model's forward. The text tower (:class:`~vitkit.model.text.TextTransformer`)
runs the same :func:`block` walk (:func:`run_text`): its own embedding, then each block with the
model's attention mask (causal and / or padding), then its norm, pooling and projection.
:func:`plan_for` returns None, with the reason, for
any model not made of vitkit's own parts (``isinstance`` on vitkit.model's classes); the
Predictor then runs the model's own forward.

The matmuls are pluggable, so the same walk serves every dtype: :class:`Dense` (``addmm`` into
the reused buffers: the model's own kernels, bit-identical; fp32 with ``exact=True``),
:class:`Packed` (fp32 and bf16 default on x86: oneDNN on weights reordered once, with GELU and the
residual add fused into the matmul; ~1.2x faster than MKL's sgemm on this project's CPU, within
float rounding of the model) and :class:`Int8` (dynamic quantization).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import Attention
from ..model.block import Block, LayerScale, Mlp, QuickGELU, SwiGLU, run_blocks
from ..model.text import TextTransformer
from ..model.vit import ViT


class Workspace:
    """Named scratch buffers for one forward. Made per call: nothing stays allocated afterwards
    and concurrent forwards never share a buffer."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like = like
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self.buffers[name] = self.like.new_empty(shape)
        return buf


# --------------------------------------------------------------------------- matmuls
class Matmul:
    """What the walk asks of a Linear: ``m(x2d, out)``, ``m.act(x2d, act, out)`` (the MLP's first
    layer and its activation) and ``m.residual(x2d, res2d, gamma, out)`` (``res2d + gamma *
    m(x2d)``: attention's output projection and the MLP's last layer). The defaults compose
    ``__call__`` with in-place pieces; a kernel that fuses them overrides these."""

    def __call__(self, x2d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def act(self, x2d: torch.Tensor, act: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
        return act_(act, self(x2d, out))

    def residual(self, x2d: torch.Tensor, res2d: torch.Tensor, gamma: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        a = self(x2d, out)
        if gamma is not None:
            a.mul_(gamma)
        return res2d.add_(a)


def _rows(layer: nn.Linear, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = layer.weight, layer.bias
    if rows is not None:
        w = w[rows]
        b = None if b is None else b[rows]
    return w, b


class _LinearMatmul(Matmul):
    """A matmul that reads ``layer`` (its ``rows`` of output features) when called."""

    def __init__(self, layer: nn.Linear, rows: slice | None = None) -> None:
        self.layer, self.rows = layer, rows

    @property
    def out_features(self) -> int:
        return _rows(self.layer, self.rows)[0].shape[0]


class Dense(_LinearMatmul):
    """``F.linear`` into a given buffer: ``addmm(bias, x, W^T, out=)`` is the kernel ``F.linear``
    runs for a contiguous input, so the result is bit-identical. ``rows`` selects output rows
    (the query or key/value part of a fused qkv). Reads the layer's tensors at call time, so a
    Predictor over fp32 weights sees later weight updates."""

    def __call__(self, x2d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        w, b = _rows(self.layer, self.rows)
        if out is None:
            return F.linear(x2d, w, b)
        if b is not None:
            return torch.addmm(b, x2d, w.t(), out=out)
        return torch.mm(x2d, w.t(), out=out)


def packed_available() -> bool:
    """Whether :class:`Packed` can run here: torch built with oneDNN, on x86-64 (where it was
    measured: docs/inference.md), and not switched off (``VITKIT_CPU_FEATURES_OFF``, vitkit.cpu)."""
    from .. import cpu

    return (torch.backends.mkldnn.is_available() and cpu.is_x86() and cpu.onednn_allowed()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Packed(_LinearMatmul):
    """fp32 / bf16 Linear on oneDNN with the weight reordered once into oneDNN's blocked layout (the
    kernel torch.compile's CPU backend uses for frozen Linear layers), with the MLP's GELU and
    the residual add fused into the matmul's epilogue. Measured 1.2x faster than ``addmm``
    (MKL's sgemm, which repacks the weight on every call) on this project's CPU at ViT-B/16
    shapes (docs/inference.md). Not bit-identical to ``F.linear`` (another summation order):
    the Predictor checks the walk against ``model(x)`` within 1e-5 at construction.

    The reordered weight is remade when the layer's weight or bias changes (their storage or
    version counter), so a Predictor still sees later weight updates."""

    _GELU = {"none": "none", "tanh": "tanh"}

    def __init__(self, layer: nn.Linear, rows: slice | None = None) -> None:
        super().__init__(layer, rows)
        self._key: tuple | None = None
        self._w = self._b = None

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        lw, lb = self.layer.weight, self.layer.bias
        key = (lw.data_ptr(), lw._version, None if lb is None else (lb.data_ptr(), lb._version))
        if key != self._key:
            w, b = _rows(self.layer, self.rows)
            self._w = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)
            self._b = None if b is None else b.detach().contiguous()
            self._key = key
        return self._w, self._b

    def __call__(self, x2d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self._packed()
        return torch.ops.mkldnn._linear_pointwise(x2d.contiguous(), w, b, "none", [], "")

    def act(self, x2d: torch.Tensor, act: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
        if type(act) is nn.GELU and act.approximate in self._GELU:
            w, b = self._packed()
            return torch.ops.mkldnn._linear_pointwise(x2d.contiguous(), w, b, "gelu", [], self._GELU[act.approximate])
        return act_(act, self(x2d))

    def residual(self, x2d: torch.Tensor, res2d: torch.Tensor, gamma: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if gamma is not None:
            return super().residual(x2d, res2d, gamma)
        w, b = self._packed()
        return torch.ops.mkldnn._linear_pointwise.binary(x2d.contiguous(), res2d, w, b, "add")


class Int8(Matmul):
    """Dynamic int8 quantization of one Linear (weights int8 per output channel, activations
    quantized per batch on the fly): torch's fbgemm/onednn dynamic linear kernel. Writes a
    fresh tensor (the quantized kernel has no ``out=``)."""

    def __init__(self, layer: nn.Linear, rows: slice | None = None) -> None:
        w = layer.weight.detach().float()
        b = None if layer.bias is None else layer.bias.detach().float()
        if rows is not None:
            w = w[rows]
            b = None if b is None else b[rows]
        self.out_features = w.shape[0]
        # Symmetric per-output-channel scales (torch's per_channel_dynamic_qconfig): an outlier
        # row does not coarsen every other row's grid.
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
        with warnings.catch_warnings():
            # torch 2.14 marks its quantized tensor constructors deprecated (pytorch#184982) in
            # favour of torchao, not a vitkit dependency; the kernels are still torch's fastest
            # int8 path on the CPU (measured, docs/inference.md). This class is the one place to
            # change when they go.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qw = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0,
                                            torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, b)

    def __call__(self, x2d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # reduce_range=True: the 7-bit activation range fbgemm needs to avoid int16 overflow in
        # its AVX2/AVX512 accumulation (what torch.ao's quantize_dynamic uses on x86).
        return torch.ops.quantized.linear_dynamic(x2d.contiguous(), self.packed, True)


LINEARS = {"dense": Dense, "packed": Packed, "int8": Int8}


# --------------------------------------------------------------------------- in-place pieces
def act_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a known activation module in place (inference only)."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if isinstance(act, nn.ReLU):
        return x.relu_()
    if isinstance(act, nn.SiLU):
        return F.silu(x, inplace=True)
    if isinstance(act, nn.Tanh):
        return x.tanh_()
    if isinstance(act, nn.Identity):
        return x
    return x.copy_(act(x))  # QuickGELU: same values, one copy


def layer_norm_into(norm: nn.Module, x: torch.Tensor, ws: Workspace, name: str = "norm") -> torch.Tensor:
    """``norm(x)`` for (B, N, D) x into a workspace buffer: the ``native_layer_norm`` kernel
    ``F.layer_norm`` runs on the CPU, so bit-identical. RMSNorm: its own call (allocates)."""
    if type(norm) is nn.RMSNorm:
        return norm(x)
    B, N, D = x.shape
    out, _, _ = torch.ops.aten.native_layer_norm.out(
        x, [D], norm.weight, norm.bias, norm.eps,
        out0=ws.get(name, B, N, D), out1=ws.get(name + ".mean", B, N, 1), out2=ws.get(name + ".rstd", B, N, 1))
    return out


# --------------------------------------------------------------------------- the plan
_ACTS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity, QuickGELU)  # what act_ applies


@dataclass
class BlockPlan:
    norm_first: bool
    norm1: nn.Module  # nn.LayerNorm | nn.RMSNorm
    norm2: nn.Module
    qkv: Matmul
    q: Matmul  # query rows of qkv (the class-token-only last block)
    kv: Matmul  # key/value rows of qkv
    proj: Matmul
    fc1: Matmul
    fc2: Matmul
    act: nn.Module
    glu: bool  # SwiGLU: fc1 gives [gate; value], act(gate) * value feeds fc2
    gamma1: torch.Tensor | None
    gamma2: torch.Tensor | None
    num_heads: int
    head_dim: int
    scale: float


@dataclass
class Plan:
    model: ViT | TextTransformer
    blocks: list[BlockPlan]
    modules: list[nn.Module]  # every module the walk replaces: hooks on them force the model's path


def _children(m: nn.Module) -> set[str]:
    return {n for n, _ in m.named_children()}


def _plain_norm(m: Any) -> bool:  # what layer_norm_into reproduces
    if type(m) is nn.RMSNorm:
        return len(m.normalized_shape) == 1
    return (type(m) is nn.LayerNorm and m.elementwise_affine and m.bias is not None
            and len(m.normalized_shape) == 1)


def _block_reason(i: int, blk: nn.Module) -> str | None:
    """None when block ``i`` is vitkit's Block made only of the parts :func:`block` reproduces
    (a part replaced after construction, e.g. by an adapter, is not); else why not."""
    if not isinstance(blk, Block):
        return f"block {i} is {type(blk).__name__}, not vitkit's Block"
    extra = _children(blk) - {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
    if extra:
        return f"block {i} has parts the engine does not know: {sorted(extra)}"
    for n in ("norm1", "norm2"):
        if not _plain_norm(getattr(blk, n)):
            return f"block {i} {n} is {type(getattr(blk, n)).__name__}, not a plain LayerNorm or RMSNorm"
    attn, mlp = blk.attn, blk.mlp
    if not isinstance(attn, Attention) or _children(attn) - {"qkv", "proj", "proj_drop"}:
        return f"block {i} attention is not the plain fused-qkv Attention"
    if not (type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear):
        return f"block {i} attention projections are not nn.Linear"
    if not isinstance(mlp, (Mlp, SwiGLU)) or _children(mlp) - {"fc1", "act", "fc2", "drop"}:
        return f"block {i} MLP is not the plain fc1-act-fc2 Mlp or the packed SwiGLU ({type(mlp).__name__})"
    if not (type(mlp.fc1) is nn.Linear and type(mlp.fc2) is nn.Linear):
        return f"block {i} MLP layers are not nn.Linear"
    if not isinstance(mlp.act, _ACTS):
        return f"block {i} activation {type(mlp.act).__name__} is not one the engine applies in place"
    for n in ("ls1", "ls2"):
        ls = getattr(blk, n)
        if ls is not None and not isinstance(ls, LayerScale):
            return f"block {i} {n} is {type(ls).__name__}, not LayerScale"
    return None


_TOP = {"patch_embed", "pos_drop", "norm_pre", "blocks", "norm", "fc_norm", "pre_logits", "head_drop", "head",
        "attn_pool", "head_dist"}
_TEXT_TOP = {"token_embed", "blocks", "norm", "proj"}


def plan_for(model: nn.Module, linear: str = "dense") -> tuple[Plan | None, str]:
    """The walk for ``model`` (a ViT or a TextTransformer) with ``linear`` matmuls ("dense" |
    "packed" | "int8"), or (None, why not)."""
    if isinstance(model, ViT):
        top = _TOP
    elif isinstance(model, TextTransformer):
        top = _TEXT_TOP
    else:
        return None, f"{type(model).__name__} is not a vitkit ViT or TextTransformer"
    extra = _children(model) - top
    if extra:
        return None, f"the model has parts the engine does not know: {sorted(extra)}"
    if len(model.blocks) == 0:
        return None, "the model has no blocks"
    for i, blk in enumerate(model.blocks):
        why = _block_reason(i, blk)
        if why:
            return None, why
    Lin = LINEARS[linear]
    plans = []
    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        D = a.qkv.in_features
        plans.append(BlockPlan(
            norm_first=blk.norm_first, norm1=blk.norm1, norm2=blk.norm2,
            qkv=Lin(a.qkv), q=Lin(a.qkv, slice(0, D)), kv=Lin(a.qkv, slice(D, None)), proj=Lin(a.proj),
            fc1=Lin(m.fc1), fc2=Lin(m.fc2), act=m.act, glu=isinstance(m, SwiGLU),
            gamma1=None if blk.ls1 is None else blk.ls1.gamma, gamma2=None if blk.ls2 is None else blk.ls2.gamma,
            num_heads=a.num_heads, head_dim=a.head_dim, scale=float(a.scale)))
    modules = list(model.blocks.modules()) + [model.norm]
    return Plan(model=model, blocks=plans, modules=modules), ""


# --------------------------------------------------------------------------- the walk
def block(p: BlockPlan, x: torch.Tensor, ws: Workspace, k: int | None = None,
          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One block on the residual stream ``x`` (B, N, D, contiguous, owned by the caller) ->
    (B, N, D), or with ``k`` the first k tokens' outputs alone, (B, k, D) (what a class-token
    head reads from the last block: every token is still a key and a value; the queries, the
    output projection, the residuals, the norms after attention and the MLP run for those k
    tokens, ~1/6 of the block's cost at 197 tokens). ``attn_mask``: Attention's (the text
    tower's causal / padding mask), passed to SDPA as the model passes it.

    The stream is updated in place by the buffer-writing matmuls (a new tensor from fused
    ones). With :class:`Dense` matmuls these are the calls of ``Block.forward(x, k)`` on the same
    views (``addmm`` is ``F.linear``'s kernel; the query rows go through ``F.linear`` on the
    same slice as Attention), so the same bits."""
    B, N, D = x.shape
    M = N if k is None else k  # rows that leave the block
    H, hd = p.num_heads, p.head_dim
    h = layer_norm_into(p.norm1, x, ws) if p.norm_first else x
    if k is None:
        qkv = p.qkv(h.reshape(B * N, D), ws.get("qkv", B * N, 3 * D))
        q, k_, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd)
    else:
        q = p.q(h[:, :k]).reshape(B, k, H, hd).transpose(1, 2)  # (B, heads, k, hd)
        kv = p.kv(h.reshape(B * N, D), ws.get("kv", B * N, 2 * D))
        k_, v = kv.view(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd)
        x = x[:, :k].contiguous()  # (B, k, D): the residual stream of the tokens that go on
    o = F.scaled_dot_product_attention(q, k_, v, attn_mask=attn_mask, scale=p.scale)  # (B, heads, M, hd)
    x = p.proj.residual(o.transpose(1, 2).reshape(B * M, D), x.view(B * M, D), p.gamma1,
                        ws.get("out", B * M, D)).view(B, M, D)
    if not p.norm_first:
        x.copy_(layer_norm_into(p.norm1, x, ws))
    h = layer_norm_into(p.norm2, x, ws) if p.norm_first else x
    if p.glu:  # act(gate) * value into a contiguous buffer: the input fc2 gets in the model
        hid = p.fc1(h.reshape(B * M, D), ws.get("hidden", B * M, p.fc1.out_features))
        gate, value = hid.chunk(2, dim=-1)
        hid = torch.mul(act_(p.act, gate), value, out=ws.get("glu", B * M, gate.shape[1]))
    else:
        hid = p.fc1.act(h.reshape(B * M, D), p.act, ws.get("hidden", B * M, p.fc1.out_features))
    x = p.fc2.residual(hid, x.view(B * M, D), p.gamma2, ws.get("out", B * M, D)).view(B, M, D)
    if not p.norm_first:
        x.copy_(layer_norm_into(p.norm2, x, ws))
    return x


OUTPUTS = ("logits", "pooled", "tokens")


def run(plan: Plan, x: torch.Tensor, output: str = "logits", last_queries: int | None = None) -> torch.Tensor:
    """Image (B, C, H, W) -> the model's ``output`` in eval mode without autograd: "logits" what
    ``model(x)`` returns, "pooled" ``forward_head(tokens, pre_logits=True)``, "tokens" the
    tokens after the final norm (B, R+N, D). ``last_queries``: ``run_blocks``'s (the head's
    tokens only from the last block)."""
    m = plan.model
    t = m.embed(x)  # (B, R+N, D): the model's own patch/prefix/position/norm_pre code
    ws = Workspace(t)
    s = ws.get("stream", *t.shape).copy_(t)  # owned here (contiguous): blocks update it in place
    out = m.run_blocks(s, last_queries=last_queries,
                       block=lambda i, x, k: block(plan.blocks[i], x, ws, k))
    tokens = m.norm(out.tokens)
    return tokens if output == "tokens" else m.forward_head(tokens, pre_logits=output == "pooled")


def run_text(plan: Plan, ids: torch.Tensor, output: str = "logits",
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids (B, L) of a :class:`~vitkit.model.text.TextTransformer` plan -> the text tower's
    ``output`` in eval mode without autograd: "logits" what ``model(ids, attention_mask)`` returns
    (the projected embedding (B, E)), "pooled" the pooled token before the projection (B, D),
    "tokens" ``forward_features`` (B, L, D). The model's own embedding, mask, final norm,
    pooling and projection around the same :func:`block` walk as images, every block given the
    model's mask (causal and / or padding). Every token runs through the last block: the pooled
    token's position differs per text (end-of-text), so there is no leading-token shortcut."""
    m = plan.model
    if output != "tokens":
        ids, attention_mask = m.trim(ids, attention_mask)  # CLIP: nothing after the pooled token is read
    t = m.embed(ids)  # (B, L, D)
    mask = m.attention_mask(ids, attention_mask)  # (B or 1, 1, L, L) bool | None
    ws = Workspace(t)
    s = ws.get("stream", *t.shape).copy_(t)
    out = run_blocks(m.blocks, s, block=lambda i, x, k: block(plan.blocks[i], x, ws, k, mask))
    tokens = m.norm(out.tokens)
    return tokens if output == "tokens" else m.forward_head(tokens, ids, pre_logits=output == "pooled")
