"""X-EcoMLA: upcycle a pretrained GQA Llama (SmolLM2-135M) into MLA by SVD, then distil it from
the original model on a mix of four registers of English (KJV chapters, Debian Administrator's
Handbook sections, Jargon File entries, fortunes; research/data/README.md), with every 20th
document of each held out: perplexity is reported per source and as their mean.

    python -m experiments.x_ecomla --config configs/x_ecomla.py --workdir runs/x_ecomla_kv15
    python -m experiments.x_ecomla --config configs/x_ecomla.py:kv50 --workdir runs/x_ecomla_kv50
    python -m experiments.x_ecomla --config configs/x_ecomla.py:kv25 --workdir runs/x_ecomla_kv25
    python -m experiments.x_ecomla --config configs/x_ecomla.py:smoke --workdir /tmp/smoke

Pipeline: activation-aware SVD initialisation with the shared RoPE key fitted to the RoPE scores
(``rope_key=shared_fit``), 100 local Adam steps per MLA layer (layer-wise reconstruction), then KD.

Presets (comma-separated; ``smoke`` shrinks any of them to seconds on a tiny random model). SmolLM2
caches 384 values per token and layer (3 KV heads x 64 dims x 2); each KV preset is the RoPE layout
with the lowest held-out perplexity at initialisation that we measured for its budget:
  (none)  15.6% (6.4x): 60 values = r_kv 56 + one shared RoPE key of d_r 4 (2 frequency pairs)
  kv25    25%: 96 values = r_kv 72 + a RoPE key of d_r 8 per former KV head (3 x 8)
  kv50    50%: 192 values = r_kv 144 + a RoPE key of d_r 16 per former KV head (3 x 16)
  hybrid  6.5x: the 2 layers with the largest KV factorisation error stay GQA, 28 MLA layers of 32 + 4
  deepseek  6.4x in DeepSeek-V3's architecture (target deepseek_v3: the latent RMSNorm, one standard
          RoPE), exported at the end to DIR/deepseek_v3 (transformers loads it; see research/upcycling)
  budget  760 KD steps (about an hour on 2 CPU cores), held-out figures at 15, 30 and 60 KD minutes
  kjv_only  calibrate, fit and distil on KJV alone (the earlier pipeline's data), still evaluated
          on every source's held-out documents
  mean_key      the earlier pipeline: the mean of the KV heads' RoPE rows, no layer-wise step
  no_layerwise  the fitted key without the layer-wise step
  gpu     a larger Llama from a local HF directory (--config.model.path=DIR), bf16, 20k KD steps
  llama3_8b  with gpu: Llama-3-8B's 6.4x, r_kv 256 + d_r 64 (320 of 2,048 values per token and layer),
          the size vLLM's compressed MLA serves; with deepseek, attention-only KD (the optimizer
          state of 8B parameters would not fit beside both models on one 141 GB GPU)
Other choices: ``--config.upcycle.rope_mode=split`` (the reference), ``activation_aware=False`` (the
reference's plain SVD), ``rank_energy=0.95``, ``gqa_layers=0,29``, ``--config.reconstruct.inputs=student``,
``--config.distill.trainable=attention``.
"""
import ml_collections

from research.core import config as config_lib
from research.upcycling.xecomla import XEcoMLA

PRESETS = ("smoke", "kv25", "kv50", "gpu", "budget", "kjv_only", "mean_key", "no_layerwise", "hybrid", "deepseek",
           "llama3_8b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/x_ecomla.py")
    # The defaults (research/upcycling/xecomla.py): SmolLM2-135M-Instruct upcycled at r_kv 56 + a
    # shared d_r 4 key (6.4x), 100 steps of layer-wise fitting, then 120 KD steps of 4 windows.
    c = config_lib.section(XEcoMLA)

    for preset in presets:
        if preset == "kv25":
            c.upcycle.kv_rank, c.upcycle.rope_dim, c.upcycle.rope_key = 72, 8, "per_kv_head"
        elif preset == "kv50":
            c.upcycle.kv_rank, c.upcycle.rope_dim, c.upcycle.rope_key = 144, 16, "per_kv_head"
        elif preset == "budget":  # one hour of KD steps on the 2-core CPU, evaluated at 15, 30 and 60 min
            c.train.update(steps=760, checkpoint_every=50, budget_minutes=(15.0, 30.0, 60.0))
        elif preset == "kjv_only":  # weight 0 for the other sources: held out and evaluated, never trained on
            c.data.weights = tuple(1.0 if name == "kjv" else 0.0 for name in c.data.sources)
        elif preset == "mean_key":  # the earlier pipeline: the mean RoPE key, no layer-wise step
            c.upcycle.rope_key, c.reconstruct.steps = "shared", 0
        elif preset == "no_layerwise":
            c.reconstruct.steps = 0
        elif preset == "deepseek":  # r_kv 56 + d_r 4 as the default; pairs 0 and 16 (uniform) are RoPE at theta
            c.upcycle.update(target="deepseek_v3", rope_mode="uniform")
        elif preset == "hybrid":  # 2 GQA layers (2 x 384) + 28 MLA layers of r_kv 32 + d_r 4: 1,776 (6.5x)
            c.upcycle.update(kv_rank=32, auto_gqa_layers=2)
        elif preset == "gpu":
            # A larger Llama-family model from a local HF directory (--config.model.path=DIR), e.g.
            # Llama-3.2-1B: 8 KV heads x 64 dims x 2 = 1,024 values per token and layer; r_kv 128 +
            # a shared d_r 32 key = 160 (15.6%, 6.4x). bfloat16 compute, Pallas kernels where present.
            c.model.update(source="hf", dtype="bfloat16", attention_impl="auto")
            c.upcycle.update(kv_rank=128, rope_dim=32)
            c.data.update(seq_len=512, calibration_windows=32)
            c.reconstruct.update(windows=256, heldout_windows=32, batch_windows=16)
            c.train.update(steps=20_000, batch_size=32, log_every=50, checkpoint_every=500)
            c.optim.update(warmup_steps=200)
    if "llama3_8b" in presets:  # 8 KV heads x 128 dims x 2 = 2,048 values per token and layer
        c.upcycle.update(kv_rank=256, rope_dim=64)
        c.distill.trainable = "attention"
    if "smoke" in presets:
        c.model.source = "random"
        c.upcycle.kv_rank, c.upcycle.rope_dim = 8, 4
        c.data.update(seq_len=32, eval_windows=4, calibration_windows=2, max_train_windows=16)
        c.reconstruct.update(steps=min(c.reconstruct.steps, 4), windows=8, heldout_windows=2, batch_windows=2,
                             eval_every=2)
        # batch 8: divisible by the 8 virtual devices of the tests
        c.train.update(steps=3, batch_size=8, log_every=1, checkpoint_every=2, progress=False)
    return c
