"""Pallas kernels, each beside the pure-XLA reference it must equal (research.kernels.reference)."""
