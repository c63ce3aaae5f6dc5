"""Evaluation: top-1 / top-5 / loss / per-class P-R-F1 / confusion matrix, or MAE / RMSE / R^2.

Imports nothing from ``vitkit.train`` (training calls evaluation, never the other way round):
the metrics (:mod:`vitkit.eval.metrics`) and the loader of a split (:func:`eval_loader`) live here.
"""

from .evaluate import eval_loader, evaluate, evaluate_model

__all__ = ["evaluate", "evaluate_model", "eval_loader"]
