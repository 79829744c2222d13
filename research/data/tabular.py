"""Tabular data sets shipped with scikit-learn (offline), as the framework's in-memory splits.

Rows are float32 features standardised with the training split's mean and standard deviation,
shaped (N, 1, F, 1) so that every classifier pipeline (``ImageArrays``, ``fit_classifier``, the
MLP, which flattens its input) takes them unchanged; preprocess them with mean 0 and std 1.
"""
from __future__ import annotations

import numpy as np

from research.data.pipeline import ImageArrays

TABULAR_DATASETS = ("breast_cancer",)


def breast_cancer(test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageArrays, ImageArrays]:
    """Wisconsin diagnostic breast cancer (569 x 30, 2 classes; Street et al. 1993), split into
    train / test stratified by class with a seeded shuffle."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed, stratify=data.target)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    names = tuple(str(n) for n in data.target_names)

    def rows(x, y):
        return ImageArrays(((x - mean) / std).astype(np.float32)[:, None, :, None], y.astype(np.int32), names)

    return rows(x_train, y_train), rows(x_test, y_test)
