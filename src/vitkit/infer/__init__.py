"""Fast inference beside the model: :class:`Predictor` (fp32 on oneDNN or bit-identical, bf16, int8, compile).

    from vitkit.infer import Predictor
    predict = Predictor(model, dtype="bf16")     # "fp32" (within 1e-5; exact=True: bit-identical) | "bf16" | "int8"
    logits = predict(images)                      # what model(images) returns
    embeds = Predictor(pair.text, "bf16")(ids)    # a text tower: what pair.text(ids) returns

The model keeps one plain forward; everything that only makes inference faster lives here and
reads the model's parts (see :mod:`vitkit.infer.engine`). How each choice was measured:
docs/inference.md.
"""

from .agreement import Agreement, agreement
from .predictor import DTYPES, Predictor, bf16_native

__all__ = ["Predictor", "DTYPES", "agreement", "Agreement", "bf16_native"]
