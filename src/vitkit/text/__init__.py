"""Text side of the image-text models: the tokenizer (:mod:`.tokenizer`) and loading the pair
(:mod:`.io`: :func:`load_image_text`; ``model.save_pretrained`` writes it through
:func:`vitkit.io.save_image_text`; :func:`.io.export_text_onnx` writes the text tower as an ONNX graph)."""

from .tokenizer import TOKENIZER_FILES, Tokenizer

__all__ = ["Tokenizer", "TOKENIZER_FILES"]
