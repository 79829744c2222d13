"""Token-level knowledge distillation (Hinton et al. 2015) for language models.

For next-token distributions p_T = softmax(z_T / tau) of the teacher and p_S = softmax(z_S / tau)
of the student at every position t with mask m_t = 1 (a token that counts: not padding, and not a
prompt token when only responses are distilled):

    loss = sum_t m_t [ tau^2 KL(p_T,t || p_S,t) + ce_weight * CE(y_t, softmax(z_S,t)) ]

The tau^2 factor keeps gradient magnitudes comparable across temperatures. Forward KL is the
X-EcoMLA stage-1 objective; the reference computes it over prompt tokens too, which the mask
here avoids. Functions return sums and the token count, as research.core.train expects, so that
means are exact across accumulation steps and devices.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from research.core import config as config_lib
from research.core.train import make_train_step


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What distillation trains and with which loss (the ``distill`` section of configs/x_ecomla.py)."""
    temperature: float = 1.0
    ce_weight: float = 0.0
    trainable: Literal["all", "attention"] = "all"   # attention: only the student's attention layers

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "temperature", self.temperature > 0, "> 0")
        config_lib.require(self, "ce_weight", self.ce_weight >= 0, ">= 0")

    def trainable_filter(self):
        """The NNX filter of the trained parameters."""
        return (lambda path, value: "attn" in path) if self.trainable == "attention" else nnx.Param


def kd_loss_sums(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                 labels: jax.Array | None = None, temperature: float = 1.0,
                 ce_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """student_logits, teacher_logits (B, T, V); mask (B, T); labels (B, T) int (needed when
    ce_weight > 0). Returns (loss_sum, {"loss", "kl", "ce", "count"} sums) over masked positions."""
    if temperature <= 0:
        raise ValueError(f"KD temperature must be > 0, got {temperature}")
    mask = mask.astype(jnp.float32)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1) * temperature ** 2   # (B, T)
    per_token = kl
    ce = jnp.zeros_like(kl)
    if labels is not None:
        log_p1 = log_ps if temperature == 1.0 else jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
        ce = -jnp.take_along_axis(log_p1, labels[..., None], axis=-1)[..., 0]
        per_token = kl + ce_weight * ce
    elif ce_weight:
        raise ValueError("ce_weight > 0 needs labels")
    loss = jnp.sum(per_token * mask)
    return loss, {"loss": loss, "kl": jnp.sum(kl * mask), "ce": jnp.sum(ce * mask), "count": jnp.sum(mask)}


def language_model_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                           reference_logits: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums for perplexity = exp(nll / count) and, with a reference model's logits, top-1
    agreement = agree / count. logits (B, T, V), labels and mask (B, T)."""
    mask = mask.astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    out = {"nll": jnp.sum(nll * mask), "count": jnp.sum(mask)}
    if reference_logits is not None:
        same = jnp.argmax(logits, -1) == jnp.argmax(reference_logits, -1)
        out["agree"] = jnp.sum(same.astype(jnp.float32) * mask)
    return out


def make_kd_train_step(defs, tx, teacher_graphdef, *, temperature: float = 1.0, ce_weight: float = 0.0,
                       accum_steps: int = 1):
    """step(state, teacher_state, batch) -> (state, metric sums): one optimizer step of the student
    (research.core.train's TrainState) on the KD loss against the frozen teacher's logits.

    batch: inputs (B, T) int, labels (B, T) int (next tokens), mask (B, T) (1 = distil this token).
    The teacher is an argument, not a closure, so its weights are not baked into the program."""
    def loss_fn(model, batch, rng):
        logits, _ = model(batch["inputs"])
        return kd_loss_sums(logits, batch["teacher_logits"], batch["mask"], labels=batch["labels"],
                            temperature=temperature, ce_weight=ce_weight)

    student_step = make_train_step(defs, tx, loss_fn, accum_steps)

    def step(state, teacher_state, batch):
        teacher_logits, _ = nnx.merge(teacher_graphdef, teacher_state)(batch["inputs"])
        return student_step(state, dict(batch, teacher_logits=jax.lax.stop_gradient(teacher_logits)))

    return step
