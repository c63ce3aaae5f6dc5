"""Zero-shot classification and text search with an image-text model (CLIP, OpenCLIP, SigLIP).

One module (over 400 lines) because the head, its template sets, its cache and the text side of
search are one recipe that eval, zeroshot, search and train all reuse from here.

The class names' text embeddings are a linear head on normalised image embeddings (CLIP, Radford
et al. 2021, section 3.1.4)::

    W[c] = normalize(mean_t normalize(encode_text(template_t(label_c))))       (C, E)
    logits = exp(logit_scale) * normalize(encode_image(x)) @ W.T  [+ logit_bias]  (B, C)
    probabilities: softmax over the classes (CLIP) | sigmoid of each (SigLIP)

the recipe of open_clip's ``build_zero_shot_classifier`` (normalise each prompt's embedding,
average over the templates, normalise again). With one template ``W`` is that prompt's
normalised embedding, so the logits are the model's own ``logits_per_image`` (what
transformers' zero-shot pipeline computes). ``W`` is computed once per model and
(labels, templates, device) and kept in memory (:func:`zeroshot_weights`); ``vitkit zeroshot``,
``vitkit eval --zeroshot`` and text search all go through this module.

    pair = vitkit.load_image_text("openai/clip-vit-base-patch16")
    clf = ZeroShotClassifier(pair, ["cat", "dog", "car"], templates="imagenet")
    probs = clf.head.probabilities(clf(pixels))                                  # (B, 3)

Templates: ``simple`` = ``"a photo of a {}."`` (the CLIP paper's default prompt); ``imagenet`` =
CLIP's 80 ImageNet prompts; ``imagenet7`` = the 7 of them CLIP's prompt-engineering notebook
keeps; a text holding ``{}`` is one template itself (``"{}"`` = the bare label); anything else
names a file with one template per line.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError
from ..infer import Predictor
from ..infer.backends import weights_key

# CLIP's 80 ImageNet prompts (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb; the same
# list, in the same order, as open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES: tested)
IMAGENET_TEMPLATES = tuple(f"{t}." for t in (
    "a bad photo of a {}", "a photo of many {}", "a sculpture of a {}", "a photo of the hard to see {}",
    "a low resolution photo of the {}", "a rendering of a {}", "graffiti of a {}", "a bad photo of the {}",
    "a cropped photo of the {}", "a tattoo of a {}", "the embroidered {}", "a photo of a hard to see {}",
    "a bright photo of a {}", "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a drawing of a {}", "a photo of my {}", "the plastic {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a black and white photo of the {}", "a painting of the {}",
    "a painting of a {}", "a pixelated photo of the {}", "a sculpture of the {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a plastic {}", "a photo of the dirty {}", "a jpeg corrupted photo of a {}",
    "a blurry photo of the {}", "a photo of the {}", "a good photo of the {}", "a rendering of the {}",
    "a {} in a video game", "a photo of one {}", "a doodle of a {}", "a close-up photo of the {}",
    "a photo of a {}", "the origami {}", "the {} in a video game", "a sketch of a {}", "a doodle of the {}",
    "a origami {}", "a low resolution photo of a {}", "the toy {}", "a rendition of the {}",
    "a photo of the clean {}", "a photo of a large {}", "a rendition of a {}", "a photo of a nice {}",
    "a photo of a weird {}", "a blurry photo of a {}", "a cartoon {}", "art of a {}", "a sketch of the {}",
    "a embroidered {}", "a pixelated photo of a {}", "itap of the {}", "a jpeg corrupted photo of the {}",
    "a good photo of a {}", "a plushie {}", "a photo of the nice {}", "a photo of the small {}",
    "a photo of the weird {}", "the cartoon {}", "art of the {}", "a drawing of the {}",
    "a photo of the large {}", "a black and white photo of a {}", "the plushie {}", "a dark photo of a {}",
    "itap of a {}", "graffiti of the {}", "a toy {}", "itap of my {}", "a photo of a cool {}",
    "a photo of a small {}", "a tattoo of the {}"))
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.",),
    "imagenet": IMAGENET_TEMPLATES,
    # the notebook's 7-prompt subset (open_clip's SIMPLE_IMAGENET_TEMPLATES)
    "imagenet7": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                  "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
}
IMAGE_TEXT_FAMILIES = "CLIP, OpenCLIP, SigLIP, SigLIP2"


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A set's name, one template holding ``{}``, a file of templates (one a line, blank lines and
    ``#`` comments skipped), or a list of templates -> the templates, each holding ``{}`` once."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        path = Path(templates).expanduser()
        if path.is_file():
            lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
            found = [s for s in lines if s and not s.startswith("#")]
            where = str(path)
        elif "{}" in templates:
            found, where = [templates], "the template"
        else:
            raise InputError(f"templates: expected {', '.join(TEMPLATE_SETS)}, a template holding {{}} (the label's "
                             f"place) or a file of them, got {templates!r} (no such file)")
    else:
        found, where = [str(t) for t in templates], "templates"
    if not found:
        raise InputError(f"{where}: no templates (one a line, each holding {{}} where the label goes)")
    bad = [t for t in found if t.count("{}") != 1]
    if bad:
        raise InputError(f"{where}: each template holds {{}} exactly once (the label's place); not {bad[0]!r}")
    return tuple(found)


def check_labels(labels: Sequence[str]) -> list[str]:
    """Labels stripped of surrounding whitespace; an empty or repeated label is an InputError."""
    if isinstance(labels, str):
        raise InputError("labels: expected a list of class names, got one string")
    out = [str(x).strip() for x in labels]
    if not out:
        raise InputError("no labels: zero-shot classification needs at least one class name")
    empty = [i + 1 for i, x in enumerate(out) if not x]
    if empty:
        raise InputError(f"label {empty[0]} of {len(out)} is empty; every class needs a name")
    first: dict[str, int] = {}
    for i, x in enumerate(out):
        if x in first:
            raise InputError(f"label {x!r} is given twice (labels {first[x] + 1} and {i + 1}); each class once")
        first[x] = i
    return out


def read_labels(labels: str | None = None, labels_file: str | None = None) -> list[str]:
    """``--labels a,b,c`` or ``--labels-file FILE`` (one a line; blank lines skipped) -> checked labels."""
    if bool(labels) == bool(labels_file):
        raise ConfigError("give the class names with --labels a,b,c or --labels-file FILE (one of them)")
    if labels_file:
        path = Path(labels_file).expanduser()
        if not path.is_file():
            raise InputError(f"--labels-file {path}: no such file")
        return check_labels([s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()])
    return check_labels(labels.split(","))


def load_pair(source: str, *, needed_for: str, tokenizer: str | None = None, device: str = "cpu"):
    """:func:`vitkit.load_image_text`, with a refusal that says what ``needed_for`` needs when the
    source is an image-only model (DINOv2, DeiT, a CLIP image tower alone) or lacks a tokenizer."""
    from ..text.io import load_image_text

    try:
        return load_image_text(source, tokenizer=tokenizer, device=device).eval()
    except CheckpointError as e:
        raise CheckpointError(f"{needed_for} needs an image-text model with both towers and its tokenizer "
                              f"({IMAGE_TEXT_FAMILIES}); {e}") from e


# model -> {(labels, templates, device, dtype): (C, E) weights}; weak: a dropped model drops its entries
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_forward(model, dtype: str, note: Callable[[str], None]) -> Predictor:
    """The text tower's Predictor in ``dtype``, as the image tower's (features.extract): fp32 its
    exact walk (bit-identical to ``model.text``), bf16 / int8 its approximations."""
    text = Predictor(model.text, dtype, exact=dtype == "fp32")
    if dtype != "fp32":  # what became of the approximation asked for (e.g. no native bf16: fp32)
        for n in text.notes:
            note(f"note: text tower: {n}")
    return text


@torch.no_grad()
def zeroshot_weights(model, labels: Sequence[str], templates: str | Sequence[str] = "simple", *,
                     batch_size: int = 256, cache: bool = True, note: Callable[[str], None] = lambda s: None,
                     dtype: str = "fp32") -> torch.Tensor:
    """(C, E) normalised float32 class embeddings of ``labels`` under ``templates`` (module
    docstring), in the order of ``labels``, on the model's device. Computed once per (model,
    labels, templates, device, dtype) and the text tower's weights as they are now (each
    parameter's identity and version, which every in-place change bumps: optimizer steps,
    ``load_state_dict``, ``torch.no_grad()`` edits), so a changed text tower is never served stale
    embeddings; ``cache=False`` skips the cache. ``note`` hears which labels' prompts
    are truncated to the tokenizer's context, and the Predictor's notes (bf16 on a CPU without
    native bf16 runs fp32). Two labels whose prompts tokenize to the same ids are an InputError:
    no image could tell them apart.

    ``dtype``: the text tower through :class:`vitkit.infer.Predictor`, as the image tower: "fp32"
    its exact walk (bit-identical to ``encode_text``), "bf16" / "int8" its approximations."""
    if model.tokenizer is None:
        raise ConfigError("this image-text model has no tokenizer; load it with one (vitkit.load_image_text(..., "
                          "tokenizer=DIR)) to embed class names")
    labels = check_labels(labels)
    templates = resolve_templates(templates)
    device = model.logit_scale.device
    weights = weights_key(model.text)
    key = (tuple(labels), templates, str(device), dtype, weights)
    per_model = _CACHE.setdefault(model, {}) if cache else {}
    if key in per_model:
        return per_model[key]
    C, T = len(labels), len(templates)
    texts = [t.replace("{}", c) for c in labels for t in templates]  # (C * T,) class-major, as open_clip
    tok = model.tokenizer
    ids = tok(texts)  # (C * T, L)
    # classes whose every prompt tokenizes alike (after truncation) are one class twice
    seen: dict[bytes, int] = {}
    for c in range(C):
        k = ids[c * T:(c + 1) * T].numpy().tobytes()
        if k in seen:
            raise InputError(f"labels {labels[seen[k]]!r} and {labels[c]!r} give the same tokens to this model's "
                             f"tokenizer (after its clean-up and truncation to {tok.context_length} tokens), so no "
                             "image can tell them apart; give each class a distinct name")
        seen[k] = c
    long = {}
    for i, n in enumerate(tok.lengths(texts)):
        if n > tok.context_length:
            long[labels[i // T]] = max(n, long.get(labels[i // T], 0))
    if long:
        shown = ", ".join(f"{lab!r} ({n} tokens)" for lab, n in list(long.items())[:5])
        more = f" and {len(long) - 5} more" if len(long) > 5 else ""
        note(f"note: the prompts of {len(long)} label(s) are longer than this model's {tok.context_length}-token "
             f"context and are truncated (as its tokenizer does): {shown}{more}")
    text = _text_forward(model, dtype, note)
    emb = torch.cat([model.encode_text(ids[s:s + batch_size], normalize=True, text_forward=text)
                     for s in range(0, len(ids), batch_size)]).float()  # (C * T, E)
    W = emb.reshape(C, T, -1).mean(dim=1)
    W = W / W.norm(dim=-1, keepdim=True)  # (C, E)
    for stale in [k for k in per_model if k[-1] != weights]:  # embeddings of weights that are gone
        del per_model[stale]
    per_model[key] = W
    return W


class ZeroShotHead(nn.Module):
    """(B, E) image embeddings -> (B, C) logits ``exp(logit_scale) * normalize(x) @ weights.T``
    (+ ``logit_bias``): the class names' text embeddings as a linear head. ``probabilities``
    follows the model's loss (softmax for CLIP, sigmoid for SigLIP)."""

    def __init__(self, model, labels: Sequence[str], templates: str | Sequence[str] = "simple", *,
                 batch_size: int = 256, note: Callable[[str], None] = lambda s: None, dtype: str = "fp32") -> None:
        super().__init__()
        self.labels = check_labels(labels)
        self.templates = resolve_templates(templates)
        W = zeroshot_weights(model, self.labels, self.templates, batch_size=batch_size, note=note, dtype=dtype)
        self.register_buffer("weight", W.clone())  # (C, E): a copy, the cached one stays as computed
        self.register_buffer("logit_scale", model.logit_scale.detach().clone())
        bias = model.logit_bias
        self.register_buffer("logit_bias", None if bias is None else bias.detach().clone())
        self.loss = model.loss

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = image_embeds.to(self.weight.dtype)
        x = x / x.norm(p=2, dim=-1, keepdim=True)  # (B, E)
        logits = (x @ self.weight.t()) * self.logit_scale.exp()  # (B, C)
        return logits if self.logit_bias is None else logits + self.logit_bias

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1) if self.loss == "softmax" else torch.sigmoid(logits)


class ZeroShotClassifier(nn.Module):
    """The image tower of an image-text model with a :class:`ZeroShotHead`: (B, C, H, W)
    preprocessed pixels -> (B, C) zero-shot logits. Looks like a labelled vitkit classifier
    (``labels``, ``config.num_classes``, ``preprocess_cfg``) to what scores one
    (:func:`vitkit.eval.evaluate.evaluate_model`)."""

    def __init__(self, model, labels: Sequence[str], templates: str | Sequence[str] = "simple", *,
                 batch_size: int = 256, note: Callable[[str], None] = lambda s: None, dtype: str = "fp32") -> None:
        super().__init__()
        self.vision = model.vision
        self.head = ZeroShotHead(model, labels, templates, batch_size=batch_size, note=note, dtype=dtype).to(
            model.logit_scale.device)
        self.labels = list(self.head.labels)
        self.preprocess_cfg = self.vision.preprocess_cfg

    @property
    def config(self):
        return self.vision.config.replace(num_classes=len(self.labels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision(pixels))

    def over(self, image_forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The logits computed from another forward of the image tower (``vitkit.infer.Predictor``
        in bf16 / int8): pixels -> ``head(image_forward(pixels))``."""
        return lambda x: self.head(image_forward(x))


def classifier_for_classes(model, splits, label_map: dict[str, str] | None = None,
                           templates: str | Sequence[str] = "simple", *,
                           note: Callable[[str], None] = lambda s: None, dtype: str = "fp32") -> ZeroShotClassifier:
    """The zero-shot classifier of a labelled dataset (:func:`vitkit.data.build_data`'s result):
    its labels are the class names, or the names ``label_map`` gives them (``n01440764=tench``;
    several classes may share one), which :func:`vitkit.eval.evaluate.evaluate_model` then matches
    back to the classes by name. ``dtype``: the text tower's, as :func:`zeroshot_weights`."""
    if splits.task != "classification" or not splits.classes:
        raise InputError(f"{splits.name} has no class names (task: {splits.task}); zero-shot classification needs "
                         "a labelled classification dataset (class folders, digits, cifar10, ...)")
    label_map = label_map or {}
    names = list(dict.fromkeys(label_map.get(str(c), str(c)) for c in splits.classes))
    return ZeroShotClassifier(model, names, templates, note=note, dtype=dtype)


# ------------------------------------------------------------------------------ a head to fine-tune
@torch.no_grad()
def init_head_from_text(model, pair, labels: Sequence[str], templates: str | Sequence[str] = "simple", *,
                        sample: torch.Tensor | None = None) -> float:
    """Set ``model.head`` (a Linear over the pre-logits features f, (C, D')) of a classifier built
    from ``pair``'s image tower to the zero-shot classifier of ``labels`` (WiSE-FT / FLYP's start):

        logits = exp(logit_scale) / rho * W (P f + b)  [+ logit_bias]       W: (C, E) class embeddings

    with P, b the image tower's projection (none for SigLIP) and rho the mean norm of P f + b over
    ``sample`` (a (B, C, H, W) batch as training feeds the model; rho = 1 without). rho is one
    positive number, so the initial predictions (argmax) are exactly the zero-shot ones; its
    probabilities are the zero-shot ones for an image embedding of the mean norm (the head has no
    per-image normalisation). Returns rho."""
    labels = check_labels(labels)
    W = zeroshot_weights(pair, labels, templates)  # (C, E)
    C, E = W.shape
    head = model.head
    if not isinstance(head, nn.Linear) or head.out_features != C:
        raise ConfigError(f"the model's head should be a Linear with {C} outputs (one a class), got {head}")
    proj = pair.vision.head
    P, b = (proj.weight, proj.bias) if isinstance(proj, nn.Linear) else (None, None)  # (E, D'), (E,) | None
    D = head.in_features
    if (P.shape[1] if P is not None else E) != D:
        raise ConfigError(f"the model's head reads {D}-d features, the image-text model's image embedding comes "
                          f"from {P.shape[1] if P is not None else E}-d ones: not the same image tower")
    A = W @ P if P is not None else W  # (C, D')
    c = W @ b if b is not None else torch.zeros(C)
    rho = 1.0
    if sample is not None:
        was = model.training
        model.eval()  # no dropout / drop-path in the estimate
        f = model.forward_head(model.forward_features(sample), pre_logits=True)  # (B, D')
        model.train(was)
        z = f if P is None else f @ P.t() + (b if b is not None else 0)  # (B, E)
        rho = float(z.norm(dim=-1).mean())
    s = float(pair.logit_scale.exp()) / rho
    head.weight.copy_(s * A)
    bias = s * c + (float(pair.logit_bias) if pair.logit_bias is not None else 0.0)
    if head.bias is not None:
        head.bias.copy_(bias)
    elif bias.abs().max() > 0:
        raise ConfigError("the model's head has no bias; the zero-shot head needs one (a projection bias or SigLIP's "
                          "logit bias)")
    return rho


def init_training_head(model, source: str, data, templates: str = "simple", *, say=lambda s: None) -> None:
    """``vitkit train --pretrained SOURCE --zeroshot-head``: :func:`init_head_from_text` with the
    class names of ``data`` (:func:`vitkit.data.build_data`'s result) and rho measured on the first
    training batch, read and normalised as evaluation reads it (no augmentation)."""
    from ..eval.evaluate import eval_loader, normalize

    if data.task != "classification" or not data.classes:
        raise ConfigError(f"--zeroshot-head needs class names to embed; {data.name} has none (task: {data.task})")
    pair = load_pair(source, needed_for="--zeroshot-head")
    sample = None
    for batch in eval_loader(data.train, 64, workers=0):
        if batch is not None:  # every image of a batch unreadable (--skip-bad-images): the next one
            sample = normalize(batch[0].float(), data.mean, data.std)
            break
    rho = init_head_from_text(model, pair, [str(c) for c in data.classes], templates, sample=sample)
    say(f"classifier initialised from the text embeddings of the {len(data.classes)} class names (templates "
        f"{templates!r}; mean image-embedding norm {rho:.4g} on {0 if sample is None else len(sample)} training images)")


# ------------------------------------------------------------------------------ classify images
def classify_files(model, files: Sequence[str], labels: Sequence[str], templates: str | Sequence[str] = "simple", *,
                   top_k: int = 5, batch_size: int = 32, workers: int = 0, dtype: str = "fp32",
                   progress: bool = False, note: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One result per file, in order: ``{"file", "predictions": [{"label", "prob", "logit"}]}`` (top
    ``top_k``, best first) or ``{"file", "error"}``. The images are read as ``vitkit embed`` reads
    them (vitkit.data's loader, the image tower's own preprocessing); ``encode_image`` runs through
    :class:`vitkit.features.FeatureExtractor` (``pool="head"``: the image tower's ``model(x)``).
    ``dtype`` is both towers' (:class:`vitkit.infer.Predictor`): the label embeddings are computed
    in it too, once per label set."""
    from .embed import file_dataset, iter_features
    from .extract import FeatureExtractor, FeatureSpec

    if top_k < 1:
        raise InputError(f"top-k must be >= 1, got {top_k}")
    head = ZeroShotHead(model, labels, templates, note=note, dtype=dtype).to(model.logit_scale.device)
    files = [str(f) for f in files]
    results: list[dict] = [{"file": f} for f in files]
    extractor = FeatureExtractor(model.vision, FeatureSpec(pool="head", dtype=dtype))
    k = min(top_k, len(head.labels))
    for idx, feats, failures in iter_features(extractor, file_dataset(model.vision, files), batch_size=batch_size,
                                              workers=workers, progress=progress, desc="zeroshot"):
        for i, msg in failures:
            results[i]["error"] = msg
        if not len(idx):
            continue
        with torch.no_grad():
            logits = head(torch.from_numpy(feats).to(head.weight.device))  # (B, C)
            probs = head.probabilities(logits)
        for i, lg, pr in zip(idx.tolist(), logits.cpu(), probs.cpu()):
            if not torch.isfinite(lg).all():
                results[i]["error"] = f"{files[i]}: the model's output for it is not finite; nothing to report"
                continue
            p, c = pr.topk(k)
            results[i]["predictions"] = [{"label": head.labels[j], "prob": float(pj), "logit": float(lg[j])}
                                         for pj, j in zip(p.tolist(), c.tolist())]
    return results


# ------------------------------------------------------------------------------ text search
def read_texts(path: str | Path) -> list[str]:
    """One text a line (surrounding whitespace stripped, blank lines skipped, repeats kept once)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{p}: no such text file (one text a line)")
    texts = list(dict.fromkeys(s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()))
    if not texts:
        raise InputError(f"{p}: no texts (one a line)")
    return texts


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], *, batch_size: int = 256, normalize: bool = False,
                 note: Callable[[str], None] = lambda s: None, dtype: str = "fp32") -> np.ndarray:
    """(N,) texts -> (N, E) float32 text embeddings (``encode_text``), batched; ``note`` hears which
    texts are truncated to the tokenizer's context and the Predictor's notes. ``dtype``: the text
    tower through :class:`vitkit.infer.Predictor` (built once per call), as :func:`zeroshot_weights`."""
    texts = list(texts)
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise InputError(f"text {empty[0]} of {len(texts)} is empty; a query needs words")
    tok = model.tokenizer
    if tok is not None:
        long = [(t, n) for t, n in zip(texts, tok.lengths(texts)) if n > tok.context_length]
        if long:
            note(f"note: {len(long)} text(s) are longer than this model's {tok.context_length}-token context and are "
                 "truncated (as its tokenizer does): " + ", ".join(f"{t[:40]!r} ({n} tokens)" for t, n in long[:3]))
    text = _text_forward(model, dtype, note)
    out = [model.encode_text(texts[s:s + batch_size], normalize=normalize, text_forward=text).float().cpu()
           for s in range(0, len(texts), batch_size)]
    return torch.cat(out).numpy()


def text_meta(source: str, normalize: bool) -> dict:
    """The embeddings-table metadata of text rows: ``pool="head"`` / fp32 / one layer, the settings
    under which the image tower's vectors share their space (so image queries embed alike)."""
    return {"model": source, "input": "text", "pool": "head", "layers": 1, "normalize": bool(normalize),
            "dtype": "fp32"}


def embed_texts(model, texts: Sequence[str], out, *, source: str, normalize: bool = False, batch_size: int = 256,
                overwrite: bool = False, inputs: Sequence = (), note: Callable[[str], None] = lambda s: None):
    """Write texts' embeddings as an embeddings table (``path`` = the text, ``label`` null), its
    metadata recording the model (:func:`text_meta`), so ``vitkit search`` finds texts by image.
    An existing ``out`` is replaced only when it is a text table of the same settings (texts are
    cheap to embed again), or with ``overwrite``. Returns (N, E)."""
    from .embed import claim_table
    from .table import read_meta, write_embeddings

    texts = list(texts)
    meta = text_meta(source, normalize)
    with claim_table(out, inputs):
        if Path(out).exists() and not overwrite:
            try:
                was = read_meta(out)
            except Exception:  # noqa: BLE001 - pyarrow's errors vary: anything unreadable is not ours to replace
                was = None
            if not was or any(was.get(k) != v for k, v in meta.items()):
                what = "an unreadable file" if was is None else (
                    f"a table of {was.get('input', 'image')}s made with {was.get('model')!r}")
                raise ConfigError(f"{out} exists ({what}); pass --overwrite to replace it, or choose another --out")
        X = encode_texts(model, texts, batch_size=batch_size, normalize=normalize, note=note)
        write_embeddings(out, texts, [None] * len(texts), X, meta=meta)
    return X.shape


def same_space(meta: dict, vision) -> str | None:
    """Why an index with this metadata does not hold the image tower's ``model(x)`` (the vectors
    text embeddings compare with), or None when it does."""
    pool, layers = meta.get("pool", "model"), int(meta.get("layers", 1))
    if layers != 1:
        return f"it concatenates the last {layers} blocks (--layers {layers})"
    if pool == "head" or (pool == "model" and not vision.config.num_classes):
        return None  # model(x); without a projection head, the pooled output is model(x) itself
    if pool == "model":
        return ("its vectors are the image tower's pooled output before the projection into the image-text space "
                "(--pool model)")
    return f"its vectors are the {pool!r} pooling of the image tower's tokens (--pool {pool})"


def text_query_vectors(index, texts: Sequence[str], *, model=None, source: str | None = None, device: str = "cpu",
                       tokenizer: str | None = None, note: Callable[[str], None] = lambda s: None) -> np.ndarray:
    """(Q, E) text embeddings of ``texts`` for searching ``index`` (a
    :class:`vitkit.features.EmbeddingIndex` of images embedded with an image-text model's image
    tower, or of texts): with the model recorded in the index (loaded here), or ``model`` /
    ``source`` when given, which must be the index's own (refused otherwise, naming both)."""
    made_by = index.meta.get("model")
    if source is not None and made_by and str(source) != str(made_by):
        raise InputError(f"{index.path} was embedded with model {made_by!r}, not {source!r}; text queries must be "
                         "embedded by the model that made the index (leave out --model, or re-embed the images "
                         "with this one)")
    if model is None:
        if not made_by and source is None:
            raise InputError(f"{index.path} does not record the model that made it; pass --model (the image-text "
                             "model it was embedded with) to embed text queries")
        model = load_pair(str(source or made_by), needed_for=f"a text query to {index.path} (made with "
                                                             f"{source or made_by})",
                          tokenizer=tokenizer, device=device)
    elif not made_by:
        note(f"note: {index.path} does not record the model that made it; text queries are embedded with the model "
             "given, which must be the one that made it")
    if index.meta.get("input") != "text":
        why = same_space(index.meta, model.vision)
        if why:
            raise InputError(f"{index.path} cannot be searched by text: {why}. Text embeddings compare with the "
                             "image tower's output in the joint image-text space: embed the images again with "
                             "`vitkit embed ... --pool head` (into another --out, or with --overwrite)")
    return encode_texts(model, texts, note=note)
