"""Machine unlearning: empirical NTK, NTK scrubbing and Fast-NTK, baselines, metrics."""
