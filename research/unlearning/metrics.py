"""How well a model has forgotten: accuracies, membership inference, distance to the retrained model.

All accuracies and the MIA efficacy are in PERCENT (0-100), so gaps are in percentage points.
An unlearned model is judged against the model retrained on D_r alone (the gold standard):

  retain_acc, forget_acc, test_acc  accuracy on D_r, D_f and the test split;
  mia        MIA efficacy on D_f: the share of forget samples that a membership classifier, trained
             to tell retain (member) from test (non-member) samples by their confidence p_y, calls
             non-members (Jia et al., NeurIPS 2023; Fan et al., ICLR 2024 "SalUn");
  gap_to_retrain  the mean absolute difference from the retrained model over those four numbers;
  output_distance mean L1 distance between the two models' softmax outputs.
"""
from __future__ import annotations

import numpy as np
from flax import nnx
from sklearn.svm import SVC

from research.data.pipeline import ImageArrays
from research.unlearning.model import ForgetProblem, Unlearnable

METRIC_KEYS = ("retain_acc", "forget_acc", "test_acc", "mia")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, computed stably in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Percent of rows of (N, C) logits whose argmax is the (N,) label; NaN for no rows."""
    if len(labels) == 0:
        return float("nan")
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def accuracy(unlearnable: Unlearnable, data: ImageArrays, params: nnx.State | None = None,
             batch_size: int = 500) -> float:
    """Top-1 accuracy (percent) of the model with subset ``params`` (default: its own) on ``data``."""
    return accuracy_from_logits(unlearnable.predict(data.images, batch_size, params), data.labels)


def true_class_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_y = softmax(logits)[y]: (N, C) logits, (N,) int labels -> (N,) probabilities."""
    labels = np.asarray(labels)
    return softmax(logits)[np.arange(len(labels)), labels]


def balanced_rows(n_members: int, n_nonmembers: int, seed: int = 0,
                  max_samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of equally many members and non-members: n = min(n_members, n_nonmembers, max_samples)
    of each, drawn without replacement with ``seed``. Returns (member_rows (n,), nonmember_rows (n,))."""
    n = min(n_members, n_nonmembers, max_samples or n_members)
    rng = np.random.default_rng(seed)
    return (np.sort(rng.choice(n_members, n, replace=False)),
            np.sort(rng.choice(n_nonmembers, n, replace=False)))


def _nonmember_rate(member_conf: np.ndarray, nonmember_conf: np.ndarray, forget_conf: np.ndarray) -> float:
    """Fit the rbf SVC on balanced (member = 1, non-member = 0) confidences; percent of forget
    samples it predicts non-member. C=3, gamma="auto" as in the sparsity/SalUn benchmark code."""
    # A diverged model (NaN logits) gets confidence 0 rather than stopping a whole sweep.
    member_conf, nonmember_conf, forget_conf = (np.nan_to_num(np.asarray(c, np.float64), nan=0.0)
                                                for c in (member_conf, nonmember_conf, forget_conf))
    features = np.concatenate([member_conf, nonmember_conf])[:, None]
    is_member = np.concatenate([np.ones(len(member_conf)), np.zeros(len(nonmember_conf))])
    svc = SVC(C=3, gamma="auto", kernel="rbf").fit(features, is_member)
    return 100.0 * float(np.mean(svc.predict(forget_conf[:, None]) == 0))


def mia_from_confidences(retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray,
                         seed: int = 0, max_samples: int | None = 2500) -> float:
    """MIA efficacy (percent) from true-class confidences: retain (N_r,), test (N_t,), forget (N_f,).

    A membership classifier is trained on n = min(N_r, N_t, max_samples) retain samples (members)
    and as many test samples (non-members), drawn with ``seed``; the result is the share of forget
    samples it calls non-members. 100 means D_f looks entirely unseen."""
    member_rows, nonmember_rows = balanced_rows(len(retain_conf), len(test_conf), seed, max_samples)
    return _nonmember_rate(np.asarray(retain_conf)[member_rows], np.asarray(test_conf)[nonmember_rows],
                           forget_conf)


def mia_efficacy(unlearnable: Unlearnable, params: nnx.State | None, retain: ImageArrays, test: ImageArrays,
                 forget: ImageArrays, seed: int = 0, max_samples: int | None = 2500) -> float:
    """MIA efficacy (percent) of the model with subset ``params`` on ``forget``.

    Protocol of Jia et al. 2023 ("Model sparsity can simplify machine unlearning") and Fan et al.
    2024 ("SalUn"): an SVC (rbf kernel, C=3, gamma="auto") is fitted to tell retain samples
    (members, label 1) from test samples (non-members, label 0) by the confidence p_y, with the two
    classes balanced (as many retain samples as test samples, at most ``max_samples`` each, drawn
    with ``seed``); it is applied to D_f and the share predicted non-member is returned. Only the
    drawn retain samples are evaluated, so a large D_r costs nothing extra."""
    member_rows, nonmember_rows = balanced_rows(len(retain), len(test), seed, max_samples)

    def confidence(data: ImageArrays) -> np.ndarray:
        return true_class_confidence(unlearnable.predict(data.images, params=params), data.labels)
    return _nonmember_rate(confidence(retain.subset(member_rows)), confidence(test.subset(nonmember_rows)),
                           confidence(forget))


def output_distance(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Mean over the N rows of || softmax(a_n) - softmax(b_n) ||_1 for (N, C) logits; in [0, 2]."""
    return float(np.mean(np.abs(softmax(logits_a) - softmax(logits_b)).sum(axis=-1)))


def unlearning_metrics(unlearnable: Unlearnable, params: nnx.State | None, problem: ForgetProblem,
                       seed: int = 0, max_samples: int | None = 2500, batch_size: int = 500) -> dict[str, float]:
    """{"retain_acc", "forget_acc", "test_acc", "mia"} (percent) of the model with subset ``params``
    on the problem's splits. Each split is evaluated once; the MIA reuses those logits."""
    logits = {name: unlearnable.predict(data.images, batch_size, params)
              for name, data in (("retain", problem.retain), ("forget", problem.forget), ("test", problem.test))}
    labels = {"retain": problem.retain.labels, "forget": problem.forget.labels, "test": problem.test.labels}
    out = {f"{name}_acc": accuracy_from_logits(logits[name], labels[name]) for name in logits}
    conf = {name: true_class_confidence(logits[name], labels[name]) for name in logits}
    out["mia"] = mia_from_confidences(conf["retain"], conf["test"], conf["forget"], seed, max_samples)
    return {key: out[key] for key in METRIC_KEYS}


def gap_to_retrain(metrics: dict, retrain: dict) -> float:
    """Mean over retain_acc, forget_acc, test_acc and mia of |metrics[k] - retrain[k]| (points)."""
    return float(np.mean([abs(metrics[k] - retrain[k]) for k in METRIC_KEYS]))
