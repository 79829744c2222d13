"""Distillation losses shared by experiments (knowledge distillation of language models)."""
from research.distill.kd import DistillConfig, kd_loss_sums, language_model_metrics, make_kd_train_step

__all__ = ["DistillConfig", "kd_loss_sums", "language_model_metrics", "make_kd_train_step"]
