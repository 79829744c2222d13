"""Quality of generated images against the originals: FID, an Inception-score-like score and the
embedding cosine, computed with an ImageNet classifier's features and logits.

The paper uses Inception-v3 (clean-fid) for FID and IS and CLIP for the cosine; none is available
offline here, so one network plays every part: EfficientNet-Lite0 with its ImageNet weights
(research/data/README.md), images resized to ``image_size`` (grey images repeated to 3 channels). Its pooled
features f (1280-d) give

    FID(A, B) = |mu_A - mu_B|^2 + tr(S_A + S_B - 2 (S_A S_B)^{1/2})     (Heusel et al. 2017)

of Gaussians fitted to the two sets' features; its 1000-way softmax p(y|x) gives

    IS = exp( E_x KL(p(y|x) || p(y)) ),   p(y) = E_x p(y|x)              (Salimans et al. 2016)

and ``embedding_cosine`` is the mean cosine between the features of each generated image and its
original (the paper's CLIP score with this encoder). The values are therefore comparable between
rows of one table, not with published Inception / CLIP figures.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from flax import nnx

from research.data.augment import resize
from research.models import efficientnet_lite as effnet


class FeatureExtractor:
    """features_and_logits(images) for float images (N, H, W, C) in [0, 1], in batches of
    ``batch_size``: ((N, 1280) float64 features, (N, 1000) float64 logits)."""

    def __init__(self, image_size: int = 64, weights: str = "", batch_size: int = 250):
        model = effnet.imagenet_model(conv_init=effnet.placeholder_init)
        effnet.load_pretrained(model, weights, include_head=True)
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        self.image_size = image_size
        self.batch_size = batch_size

        @jax.jit
        def apply(state, x):
            net = nnx.merge(self.graphdef, state)
            if x.shape[-1] == 1:
                x = jnp.repeat(x, 3, axis=-1)
            x = (resize(x * 255.0, (image_size, image_size, 3)) - effnet.PIXEL_MEAN) / effnet.PIXEL_STD
            features = net.features(x)
            return features, net.head(features)
        self._apply = apply

    def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, logits = [], []
        n = len(images)
        size = min(self.batch_size, n)
        for start in range(0, n, size):
            chunk = np.asarray(images[start:start + size], np.float32)
            pad = size - len(chunk)
            if pad:  # one compiled shape
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            f, l = jax.device_get(self._apply(self.state, jnp.asarray(chunk)))
            feats.append(f[:size - pad])
            logits.append(l[:size - pad])
        return np.concatenate(feats).astype(np.float64), np.concatenate(logits).astype(np.float64)


def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr (S_a S_b)^{1/2} of the covariances of centred feature rows a (N, d), b (M, d).

    S_a S_b is similar to the PSD matrix S_a^{1/2} S_b S_a^{1/2}, so the trace is the sum of the
    square roots of its eigenvalues. With fewer samples than dims those are the squared singular
    values of a b^T / sqrt((N-1)(M-1)) (the nonzero spectrum of a^T a b^T b equals that of
    (a b^T)(a b^T)^T): an N x M SVD instead of d x d matrix roots."""
    n, m, d = len(a), len(b), a.shape[1]
    if min(n, m) <= d:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1)))
    w, v = np.linalg.eigh(a.T @ a / (n - 1))
    root_a = (v * np.sqrt(np.maximum(w, 0))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ (b.T @ b / (m - 1)) @ root_a)
    return float(np.sqrt(np.maximum(inner, 0)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a (N, d) and b (M, d), N, M >= 2 (Gaussian fits, float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    trace_a, trace_b = np.sum(a ** 2) / (len(a) - 1), np.sum(b ** 2) / (len(b) - 1)
    fid = np.sum((mu_a - mu_b) ** 2) + trace_a + trace_b - 2.0 * trace_sqrt_product(a, b)
    return float(max(fid, 0.0))


def inception_score(logits: np.ndarray) -> float:
    """exp(E KL(p(y|x) || p(y))) of (N, classes) logits."""
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(0) + 1e-30)
    return float(np.exp(np.mean(np.sum(p * (log_p - log_marginal), axis=1))))


def embedding_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i): a, b (N, d), row i of each from the same image."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


def quality(generated: tuple[np.ndarray, np.ndarray], original: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """{"fid", "is", "cosine"} of generated images against their originals, each a (features,
    logits) pair from one ``FeatureExtractor``, row i of both from the same image."""
    return {"fid": frechet_distance(generated[0], original[0]), "is": inception_score(generated[1]),
            "cosine": embedding_cosine(generated[0], original[0])}
