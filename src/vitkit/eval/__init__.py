"""Evaluation: top-1 / top-5 / loss / per-class P-R-F1 / confusion matrix, or MAE / RMSE / R^2."""

from .evaluate import evaluate, evaluate_model

__all__ = ["evaluate", "evaluate_model"]
