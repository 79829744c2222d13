"""Data: sources (HF datasets, offline and hub), the batching pipeline, on-device augmentation."""
