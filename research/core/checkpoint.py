"""Orbax checkpoints of a TrainState: written atomically every N steps, restored exactly.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-write leaves the previous checkpoint intact (on a gcsfuse mount, where a folder rename is not
atomic, it marks a finished step with a commit file instead, as Orbax documents for gcsfuse). Before restoring, every array's shape in the
checkpoint is compared with the state the run built from its config; a difference fails with
the array's path and both shapes instead of restoring into the wrong model. Arrays are restored
in the dtypes of the run's state.

A run also passes its ``settings``: everything besides the model's shapes that decides the weights
(optimizer, schedule length, batch size, seed, a digest of the training data). They are kept in
``settings.json`` beside the checkpoints, and resuming under different ones fails with the first
key that changed: otherwise a finished checkpoint would be reported as the result of the new settings.

Orbax's array files carry no checksum, so each save also records a fingerprint of the values
(``fingerprints/STEP.json``: per array, the sum of its bit patterns as uint32) and a restore that
reads other values (bytes flipped on disk) is damage like a truncated file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from research.core.params import path_str
from research.core.records import as_read_back, write_json_atomic


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state built from the config."""


def array_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"path/to/array": shape} for a tree of arrays, Variables or array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {path_str(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def array_digest(*arrays: np.ndarray) -> str:
    """A short hex digest of the arrays' shapes, dtypes and bytes: names the training data in ``settings``."""
    digest = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(a)  # a C-contiguous buffer, hashed in place
    return digest.hexdigest()


def flat_items(tree, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} of a nested mapping."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    items = {}
    for key, value in tree.items():
        items.update(flat_items(value, f"{prefix}.{key}" if prefix else key))
    return items


def first_change(saved: Mapping, wanted: Mapping) -> str | None:
    """The first key (dotted, sorted) whose value differs, is added or is removed, as one phrase."""
    old, new = flat_items(as_read_back(saved)), flat_items(as_read_back(wanted))
    for key in sorted(set(old) | set(new)):
        if old.get(key, "(absent)") != new.get(key, "(absent)"):
            return f"{key}={old.get(key, '(absent)')!r}, this run has {key}={new.get(key, '(absent)')!r}"
    return None


def remove_unfinished_saves(directory: str) -> None:
    """Removes the temporary folders a save killed half-way leaves (``*.orbax-checkpoint-tmp*``) from
    ``directory``, on process 0. Left in place they would fail every resume."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if ".orbax-checkpoint-tmp" in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class CheckpointDamagedError(CheckpointMismatchError):
    """No checkpoint of a directory reads back; the message is one line naming it."""


def mount_type(path: str) -> str:
    """The file-system type of the mount that holds ``path`` (from /proc/mounts; "" when unknown)."""
    path, best, kind = os.path.realpath(path), "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def needs_commit_file(directory: str) -> bool:
    """Whether ``directory`` is on a bucket mounted by gcsfuse (the tpu-pod sweeps' workdirs), where
    renaming a folder is not atomic: Orbax then marks a finished step with a commit file instead."""
    return "gcsfuse" in mount_type(directory)


class StorageFullError(OSError):
    """A checkpoint could not be written for lack of space; the message is one line."""


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a write that found the device full (ENOSPC), however
    Orbax's writer threads wrapped it."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@jax.jit
def _fingerprint(tree) -> list[jax.Array]:
    """Per leaf, the wrapping uint32 sum of its elements' bit patterns (typed PRNG keys by their data)."""
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        return jnp.sum(jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), dtype=jnp.uint32)
    return [one(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> list[tuple[str, int]]:
    """(dtype, `_fingerprint`) of each of ``tree``'s arrays, read back to the host."""
    return [(str(x.dtype), int(v)) for x, v in zip(jax.tree.leaves(tree), jax.device_get(_fingerprint(tree)))]


class Checkpointer:
    """Saves and restores a TrainState under `directory` (one subdirectory per step). With
    ``settings`` (a JSON-able mapping), a directory holding checkpoints written under other
    settings is refused at once (:class:`CheckpointMismatchError` naming the changed key)."""

    def __init__(self, directory: str, every_steps: int, keep: int = 2, settings: Mapping | None = None):
        self.directory = os.path.abspath(directory)
        self._pending: tuple[int, int] | None = None  # (step, bytes) of the newest save handed to Orbax
        remove_unfinished_saves(self.directory)
        commit_file = ocp.path.atomicity.CommitFileTemporaryPath if needs_commit_file(self.directory) else None
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(save_interval_steps=max(every_steps, 1), max_to_keep=keep, create=True,
                                                 temporary_path_class=commit_file),
            item_handlers=ocp.StandardCheckpointHandler(),  # lets a new process read the stored shapes
        )
        if settings is not None:
            try:
                self.check_settings(settings)
            except CheckpointMismatchError:
                self.manager.close()
                raise

    def check_settings(self, settings: Mapping) -> None:
        """Compares ``settings`` with the ones the checkpoints were written under, or records them.
        A directory without checkpoints (or from before settings were kept) takes the new ones."""
        path = os.path.join(self.directory, "settings.json")
        if self.latest_step() is not None and os.path.exists(path):
            with open(path) as f:
                change = first_change(json.load(f), settings)
            if change:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory} was written with {change}; "
                    f"use a new --workdir or the settings it was written with")
            return
        write_json_atomic(path, settings)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `save` would write ``step`` (it is on the interval, or ``force``)."""
        return force or self.manager.should_save(step)

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it saved. A full disk
        (found here or by the next `wait` / `save`, as Orbax writes in the background) ends the run
        with a `StorageFullError` naming the step, the folder and the size needed; the previous
        checkpoint stays and the same command resumes from it once there is space."""
        pending = self._pending
        self._pending = (step, sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")))
        with self._full_disk_as_one_line(pending or self._pending):
            saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
            if saved:
                self._record_fingerprint(step, state)
            return saved

    def _fingerprint_path(self, step: int) -> str:
        return os.path.join(self.directory, "fingerprints", f"{step}.json")

    def _record_fingerprint(self, step: int, state: Any) -> None:
        values = fingerprint(state)  # every process takes part; the first writes it
        if jax.process_index() != 0:
            return
        folder = os.path.dirname(self._fingerprint_path(step))
        os.makedirs(folder, exist_ok=True)
        write_json_atomic(self._fingerprint_path(step), values)
        kept = {f"{s}.json" for s in self.manager.all_steps()} | {f"{step}.json"}
        for name in set(os.listdir(folder)) - kept:  # of steps rotated out
            os.remove(os.path.join(folder, name))

    @contextlib.contextmanager
    def _full_disk_as_one_line(self, pending: tuple[int, int]):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax reports a full disk as ValueError / OSError from its threads
            if not _out_of_space(e):
                raise
            step, nbytes = pending
            earlier = [s for s in self.manager.all_steps() if s < step]
            resume = f"resumes from step {max(earlier)}" if earlier else "starts again"
            raise StorageFullError(f"no space left on the device of {self.directory} while saving step {step} (a "
                                   f"checkpoint is about {nbytes / 2 ** 20:,.1f} MiB); free space and run the same "
                                   f"command: it {resume}") from None

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
        """Restores into the structure, shardings and dtypes of `target` (arrays or ShapeDtypeStructs).
        Without ``step``: the newest checkpoint that reads back. One that does not (a truncated file,
        flipped bytes, an empty metadata file) is moved aside to ``damaged-STEP`` with a line saying so,
        and the one before it is tried; a checkpoint of another model is not damage and fails at once."""
        if step is not None:
            return self._restore(target, step)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore(target, step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step's files is damage
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                aside = os.path.join(self.directory, f"damaged-{step}")
                if jax.process_index() == 0:  # one process moves it; each goes on to the step before
                    os.rename(os.path.join(self.directory, str(step)), aside)
                self.manager.reload()
                print(f"checkpoint step {step} of {self.directory} cannot be read ({reason}); moved to {aside}, "
                      f"trying the step before it", file=sys.stderr, flush=True)
        raise CheckpointDamagedError(f"no checkpoint under {self.directory} can be read (the damaged ones are kept as "
                                     f"damaged-STEP); remove the folder to start over")

    def _restore(self, target: Any, step: int) -> Any:
        self.check_compatible(step, target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        if os.path.exists(self._fingerprint_path(step)):  # checkpoints written before fingerprints have none
            with open(self._fingerprint_path(step)) as f:
                expected = [tuple(x) for x in json.load(f)]
            paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(restored)[0]]
            for path, found, saved in zip(paths, fingerprint(restored), expected, strict=True):
                if found[0] == saved[0] and found[1] != saved[1]:  # an array restored in another dtype is not compared
                    raise ValueError(f"array '{path}' reads back other values than were saved (bytes changed on disk)")
        return restored

    def wait(self) -> None:
        with self._full_disk_as_one_line(self._pending or (-1, 0)):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
