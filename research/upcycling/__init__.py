"""X-EcoMLA: upcycling a pretrained GQA model into MLA (``upcycle``) and fitting the upcycled layers
to the teacher's (``reconstruct``). Imports models and attention; neither imports it.

    from research.upcycling import UpcycleConfig, upcycle_gqa_to_mla
    student, report = upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=56, rope_dim=4))
"""
from research.upcycling.reconstruct import ReconstructConfig, reconstruct_layers
from research.upcycling.upcycle import UpcycleConfig, upcycle_gqa_to_mla

__all__ = ["ReconstructConfig", "reconstruct_layers", "UpcycleConfig", "upcycle_gqa_to_mla"]
