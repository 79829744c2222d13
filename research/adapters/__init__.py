"""Parameter-efficient adaptation: LoRA for any NNX model, visual prompts for the ViT, Online-LoRA."""
