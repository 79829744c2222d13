"""X-EcoMLA upcycling: exact at full rank with every RoPE pair kept; the factorisation choices."""
import numpy as np
import pytest

import jax.numpy as jnp

from research.upcycling.upcycle import (UpcycleConfig, energy_rank, fit_shared_rope_key, latent_norm_gain, low_rank,
                                        select_rope_pairs, upcycle_gqa_to_mla)
from tests.models.tiny_llama import TINY, random_llama

TOKENS = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 12))


@pytest.fixture(scope="module")
def teacher():
    return random_llama(TINY)


def relative_error(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


FULL = dict(kv_rank=10**6, rope_dim=TINY.head_dim, rope_key="per_kv_head")


@pytest.mark.parametrize("options", [
    dict(rope_mode="high"),
    dict(rope_mode="2norm"),
    dict(rope_mode="uniform", q_rank=10**6),
    dict(rope_mode="low", activation_aware=True, kv_svd_rows="all"),
], ids=["high", "2norm", "q_compressed", "activation_aware"])
def test_full_rank_with_all_pairs_reproduces_the_logits(teacher, options):
    student, report = upcycle_gqa_to_mla(teacher, UpcycleConfig(**FULL, **options), TOKENS)
    assert report["layer_kinds"] == ["mla"] * TINY.num_layers
    expected, _ = teacher(jnp.asarray(TOKENS))
    got, _ = student(jnp.asarray(TOKENS))
    assert relative_error(got, expected) < 1e-5


def test_whole_pairs_with_a_low_rank_differ_and_the_reference_split_is_not_exact(teacher):
    expected, _ = teacher(jnp.asarray(TOKENS))
    split, _ = upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=10**6, rope_dim=4, rope_mode="split",
                                                         rope_key="per_kv_head"))
    assert relative_error(split(jnp.asarray(TOKENS))[0], expected) > 1e-2  # new frequencies: a warm start


def test_activation_aware_factorisation_has_lower_error_on_the_activations():
    rng = np.random.RandomState(0)
    w = rng.randn(24, 16)
    x = rng.randn(500, 16) @ np.diag(np.linspace(3, 0.05, 16))  # anisotropic activations
    plain_a, plain_b, _ = low_rank(w, 6)
    chol = np.linalg.cholesky(x.T @ x / len(x))
    aware_a, aware_b, _ = low_rank(w, 6, chol)
    err = lambda a, b: np.linalg.norm((w - a @ b) @ x.T)  # noqa: E731
    assert err(aware_a, aware_b) < 0.9 * err(plain_a, plain_b)
    # On the weights alone the plain SVD is optimal (Eckart-Young).
    assert np.linalg.norm(w - plain_a @ plain_b) <= np.linalg.norm(w - aware_a @ aware_b)


def test_energy_rank_and_pair_selection():
    s = np.sqrt(np.array([50.0, 30, 10, 5, 3, 1, 0.5, 0.5] + [0.0] * 12))
    assert energy_rank(s, 0.80, multiple=1) == 2 and energy_rank(s, 0.90, multiple=1) == 3
    assert energy_rank(s, 0.90) == 8 and energy_rank(s, 1.0, multiple=1) == 8
    assert list(select_rope_pairs("high", 3, 8)) == [0, 1, 2]
    assert list(select_rope_pairs("low", 3, 8)) == [5, 6, 7]
    assert list(select_rope_pairs("uniform", 4, 8)) == [0, 2, 4, 6]
    assert list(select_rope_pairs("2norm", 2, 4, np.array([0.1, 3.0, 0.2, 2.0]))) == [1, 3]


def rope_score_error(q_rope, k_rope, q_new, k_shared, x, seed=0):
    """Mean squared error of every head's RoPE score q_pe(m) . k_pe(n) over random token pairs at
    random positions (up to 4096 apart): the shared key (and rescaled queries) against the original
    per-KV-head keys. Rotation in complex form: pair p times e^{i theta_p m}."""
    rng = np.random.RandomState(seed)
    h, k, n = len(q_rope), len(k_rope), q_rope.shape[1] // 2
    theta = 10000.0 ** (-np.arange(n) / n)
    m, t = rng.randint(0, len(x), 4000), rng.randint(0, len(x), 4000)
    phase = np.exp(1j * np.outer(rng.randint(0, 4096, 4000), theta))          # (P, n)
    z = lambda rows, idx: np.einsum("td,...pd->...tp", x[idx], rows[..., :n, :] + 1j * rows[..., n:, :])  # noqa: E731
    group = np.arange(h) // (h // k)
    exact = np.real(z(q_rope, m) * z(k_rope, t)[group].conj() * phase).sum(-1)    # (H, P)
    shared = np.real(z(q_new, m) * z(k_shared, t).conj() * phase).sum(-1)
    return float(((shared - exact) ** 2).mean())


def test_fitted_shared_key_is_the_mean_when_every_kv_head_has_the_same_rope_rows():
    rng = np.random.RandomState(1)
    x = rng.randn(300, 16)
    q_rope, k_row = rng.randn(6, 4, 16), rng.randn(4, 16)
    shared, queries = fit_shared_rope_key(q_rope, np.stack([k_row] * 3), x)
    np.testing.assert_allclose(shared, k_row, atol=1e-9)
    np.testing.assert_allclose(queries, q_rope, atol=1e-9)


def test_fitted_shared_key_reproduces_the_grouped_rope_scores_better_than_the_mean():
    rng = np.random.RandomState(2)
    x = rng.randn(2000, 16) @ np.diag(np.linspace(2, 0.1, 16))
    k_base = rng.randn(4, 16)
    k_rope = np.stack([k_base + 0.8 * rng.randn(4, 16) for _ in range(3)])    # KV heads that differ
    q_rope = rng.randn(6, 4, 16) * np.array([3, 3, 1, 1, 0.3, 0.3])[:, None, None]  # unequal groups
    shared, queries = fit_shared_rope_key(q_rope, k_rope, x)
    fitted = rope_score_error(q_rope, k_rope, queries, shared, x)
    mean = rope_score_error(q_rope, k_rope, q_rope, k_rope.mean(0), x)
    assert fitted < 0.7 * mean


def test_latent_norm_gain_is_the_least_squares_gain_and_exact_when_every_token_has_one_rms():
    rng = np.random.default_rng(0)
    same_rms = rng.normal(size=(50, 8))
    same_rms *= 3.0 / np.sqrt((same_rms ** 2).mean(axis=1, keepdims=True))
    normed = same_rms / np.sqrt((same_rms ** 2).mean(axis=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(latent_norm_gain(same_rms) * normed, same_rms, rtol=1e-6)
    latent = rng.normal(size=(200, 8)) * rng.uniform(0.1, 5, (200, 1))      # token RMS spread 50x
    normed = latent / np.sqrt((latent ** 2).mean(axis=1, keepdims=True) + 1e-6)
    gain = latent_norm_gain(latent)
    error = lambda g: ((g * normed - latent) ** 2).sum()                      # noqa: E731
    assert all(error(gain) < error(gain * (1 + d)) for d in (-0.01, 0.01))


def test_deepseek_target_puts_the_fitted_latent_norm_in_every_layer(teacher):
    student, report = upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=8, rope_dim=4, rope_mode="uniform", q_rank=16,
                                                                target="deepseek_v3"), TOKENS)
    attn = student.segments[0].attn
    assert attn.mla.latent_norm and report["layer_kinds"] == ["mla"] * TINY.num_layers
    for norm in (attn.kv_norm, attn.q_norm):
        scale = np.asarray(norm.scale[...])
        assert scale.shape[0] == TINY.num_layers and np.all(np.isfinite(scale)) and not np.allclose(scale, 1.0)
    with pytest.raises(ValueError, match="calibration tokens"):
        upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=8, rope_dim=4, rope_mode="uniform", target="deepseek_v3"))
    with pytest.raises(ValueError, match="rope_dim / 2 to divide"):
        upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=8, rope_dim=6, rope_mode="uniform", target="deepseek_v3"),
                           TOKENS)


def test_hybrid_keeps_the_worst_factorised_layers_as_gqa(teacher):
    student, report = upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=4, rope_dim=4, auto_gqa_layers=1), TOKENS)
    worst = int(np.argmax(report["kv_error"]))
    assert report["layer_kinds"][worst] == "gqa" and report["layer_kinds"].count("gqa") == 1
    assert len(student.segments) == 2
    gqa_per_token = 2 * TINY.num_kv_heads * TINY.head_dim
    assert student.kv_values_per_token() == gqa_per_token + 4 + 4  # one GQA layer + r_kv + d_r


def test_bad_choices_name_the_field(teacher):
    with pytest.raises(ValueError, match="rope_mode"):
        upcycle_gqa_to_mla(teacher, UpcycleConfig(rope_mode="middle"))
    with pytest.raises(ValueError, match="rope_dim"):
        upcycle_gqa_to_mla(teacher, UpcycleConfig(rope_dim=3))
    with pytest.raises(ValueError, match="calibration"):
        upcycle_gqa_to_mla(teacher, UpcycleConfig(rope_dim=4, rope_mode="2norm"))


def test_smollm2_at_full_rank_with_all_pairs_is_the_original_model(smollm2, smollm2_tokenizer):
    """The invariant on real weights: SmolLM2-135M (30 layers, 9 query / 3 KV heads) upcycled with
    a full-rank latent, every RoPE pair kept and a RoPE key per KV head gives the same logits."""
    config, teacher = smollm2
    tokens = jnp.asarray([smollm2_tokenizer.encode(
        "In the beginning God created the heaven and the earth. And the earth was without form, and void.")])
    student, report = upcycle_gqa_to_mla(teacher, UpcycleConfig(**FULL_SMOLLM2), np.asarray(tokens))
    assert max(report["kv_error"]) < 1e-6  # the latent spans [K_rep; V_rep] (rank 2 x 3 x 64 = 384 of 576)
    expected, _ = teacher(tokens)
    got, _ = student(tokens)
    assert relative_error(got, expected) < 1e-4


FULL_SMOLLM2 = dict(kv_rank=10**6, rope_dim=64, rope_mode="2norm", rope_key="per_kv_head", activation_aware=True)
