"""Core: configs and CLI, mesh and sharding, optimizers, train steps, the loop, checkpoints, records."""
