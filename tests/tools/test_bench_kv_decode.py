"""The decode benchmark on a small model: every variant timed, KV bytes as the formulas say."""
import dataclasses

from research.models.llama import LlamaConfig
from tools.bench import kv_decode


def test_measured_row_on_a_small_model():
    small = dataclasses.replace(LlamaConfig(), vocab_size=128, dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                                mlp_dim=64)
    teacher, student = kv_decode.build_models(layers=2, kv_rank=8, rope_dim=4, config=small)
    row = kv_decode.measure(teacher, student, [64], batch=2, repeats=1, pallas=True)[0]
    assert row["gqa_kv_bytes_per_token"] == 4 * 2 * (2 * 2 * 16)           # float32, 2 layers, K=2, d_h=16
    assert row["mla_absorbed_kv_bytes_per_token"] == 4 * 2 * (8 + 4)       # r_kv + d_r per layer
    for name in ("gqa", "mla_naive", "mla_absorbed", "mla_absorbed_pallas"):
        assert row[f"{name}_attention_ms"] > 0 and row[f"{name}_model_ms"] > 0
    assert row["attention_speedup_mla_absorbed"] == row["gqa_attention_ms"] / row["mla_absorbed_attention_ms"]
