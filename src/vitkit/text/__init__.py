"""Text side of the image-text models: the tokenizer (:mod:`.tokenizer`) and the pair's
persistence and loading (:mod:`.io`: :func:`load_image_text`, :func:`save_image_text`)."""

from .tokenizer import TOKENIZER_FILES, Tokenizer

__all__ = ["Tokenizer", "TOKENIZER_FILES"]
