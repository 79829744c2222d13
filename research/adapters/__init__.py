"""Parameter-efficient adaptation: LoRA for any NNX model, visual prompts for the ViT, Online-LoRA.

    from research.adapters import LoraSpec, add_lora, merge_and_unload, trainable_filter
    add_lora(model, LoraSpec(r"attn/(q|v)$", rank=8, alpha=16.0), rngs=nnx.Rngs(0))
"""
from research.adapters.lora import (LoraSpec, add_lora, delete_adapter, load_adapters, lora_filter, merge, merge_and_unload,
                                    save_adapters, set_active, trainable_filter, unmerge)
from research.adapters.online_lora import OnlineLoRA, OnlineLoraConfig
from research.adapters.prompts import PromptedViT, add_prompts, prompt_filter

__all__ = ["LoraSpec", "add_lora", "delete_adapter", "load_adapters", "lora_filter", "merge", "merge_and_unload", "save_adapters",
           "set_active", "trainable_filter", "unmerge", "OnlineLoRA", "OnlineLoraConfig", "PromptedViT", "add_prompts",
           "prompt_filter"]
