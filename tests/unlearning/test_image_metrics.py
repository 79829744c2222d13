"""FID, the Inception-score-like score and the embedding cosine: against the textbook formulas, and
on real images through the ImageNet EfficientNet-Lite0."""
import numpy as np
import pytest
import scipy.linalg

from research.unlearning import image_metrics


def _reference_fid(a, b):
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.trace(root)


@pytest.mark.parametrize("n, m, d", [(60, 80, 12), (40, 50, 30), (9, 12, 30)])
def test_frechet_distance_equals_the_matrix_root_formula(n, m, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(m, d)) * 2 + 0.5
    assert image_metrics.frechet_distance(a, b) == pytest.approx(_reference_fid(a, b), rel=1e-6)
    assert image_metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8 * np.sum(a ** 2))


def test_inception_score_is_one_for_one_prediction_and_k_for_k_confident_classes():
    same = np.tile(np.array([[2.0, 0.5, -1.0]]), (10, 1))
    assert image_metrics.inception_score(same) == pytest.approx(1.0)
    confident = np.repeat(np.eye(4) * 50.0, 5, axis=0)
    assert image_metrics.inception_score(confident) == pytest.approx(4.0, rel=1e-6)


def test_embedding_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert image_metrics.embedding_cosine(a, a) == pytest.approx(1.0)
    assert image_metrics.embedding_cosine(a, np.array([[0.0, 1.0], [0.0, -1.0]])) == pytest.approx(-0.5)


def test_fid_of_real_images_is_zero_against_themselves_and_grows_with_noise():
    pytest.importorskip("torch", reason="the ImageNet weights are read with torch (the `ref` extra)")
    from research.data import sources
    from research.data.pipeline import to_arrays
    from research.models import efficientnet_lite as effnet
    try:
        effnet.pretrained_state_dict_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    images = to_arrays(sources.load("digits")["train"]).images[:64].astype(np.float32) / 255.0
    extractor = image_metrics.FeatureExtractor(image_size=32, batch_size=64)
    clean = extractor.features_and_logits(images)
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (0.0, 0.1, 0.3):
        noisy = np.clip(images + sigma * rng.normal(size=images.shape), 0, 1).astype(np.float32)
        fids.append(image_metrics.quality(extractor.features_and_logits(noisy), clean)["fid"])
    assert fids[0] < 1e-6 * fids[1]
    assert fids[0] < fids[1] < fids[2]
