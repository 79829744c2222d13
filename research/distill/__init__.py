"""Distillation losses shared by experiments (knowledge distillation of language models)."""
from research.distill.kd import kd_loss_sums, language_model_metrics, make_kd_train_step

__all__ = ["kd_loss_sums", "language_model_metrics", "make_kd_train_step"]
