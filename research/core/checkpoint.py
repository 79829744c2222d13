"""Orbax checkpoints of a TrainState: written atomically every N steps, restored exactly.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-write leaves the previous checkpoint intact. Before restoring, every array's shape in the
checkpoint is compared with the state the run built from its config; a difference fails with
the array's path and both shapes instead of restoring into the wrong model. Arrays are restored
in the dtypes of the run's state.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state built from the config."""


def path_str(path) -> str:
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    # Variables wrap their array in a "value" node; drop it so both trees name arrays alike.
    return "/".join(p for p in parts if p not in ("value", "raw_value"))


def array_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"path/to/array": shape} for a tree of arrays, Variables or array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {path_str(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


class Checkpointer:
    """Saves and restores a TrainState under `directory` (one subdirectory per step)."""

    def __init__(self, directory: str, every_steps: int, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(save_interval_steps=max(every_steps, 1), max_to_keep=keep, create=True),
            item_handlers=ocp.StandardCheckpointHandler(),  # lets a new process read the stored shapes
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it saved."""
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def check_compatible(self, step: int, target: Any) -> None:
        stored = array_shapes(self.manager.item_metadata(step))
        wanted = array_shapes(target)
        missing = sorted(set(wanted) - set(stored))
        extra = sorted(set(stored) - set(wanted))
        if missing or extra:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory} step {step} has different arrays than this run's model: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        for path, shape in wanted.items():
            if stored[path] != shape:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory} step {step}: array '{path}' has shape {stored[path]}, "
                    f"this run's model expects {shape}; use a new --workdir or the config the checkpoint was written with")

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores into the structure, shardings and dtypes of `target` (arrays or ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        self.check_compatible(step, target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
