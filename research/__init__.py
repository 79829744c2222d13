"""JAX/Flax research framework: compression, efficient adaptation and machine unlearning."""
