"""What a run leaves in its workdir: config, TensorBoard events, results.json, PNG plots.

TensorBoard event files are written with the `tensorboard` package's own event writer and
protobufs, so TensorFlow is not needed. Only process 0 writes.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import IO

import jax
import numpy as np


def _write_atomic(path: str, mode: str, write: Callable[[IO], object]) -> None:
    """``write(f)`` into a temporary file in the same directory, then rename it over ``path``: a
    reader, or a run resumed after a kill, never sees half a file (a failed write leaves no trace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Created like open() creates a file (0666 less the umask), not mkstemp's owner-only 0600, so
    # results stay readable by whoever could read them before; O_EXCL keeps the name to this writer.
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def temp_dir_beside(path: str) -> str:
    """A new, empty folder next to ``path`` (same file system, so it can be renamed onto ``path``),
    created as mkdir creates one (0777 less the umask), not owner-only like ``tempfile.mkdtemp``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp, 0o777)
    return tmp


@contextlib.contextmanager
def folder_written_whole(directory: str, *, force: bool = False):
    """Yields a new folder beside ``directory`` to write into; when the block ends it is renamed onto
    ``directory`` (replacing it with ``force``), or removed if the block raised: readers never see a
    half-written folder. A FileExistsError up front when ``directory`` exists and not ``force``."""
    if os.path.exists(directory) and not force:
        raise FileExistsError(f"{directory} exists; pass force=True (--force) to overwrite it")
    tmp = temp_dir_beside(directory)
    try:
        yield tmp
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as indented JSON at ``path``, written atomically (numpy and jax scalars and arrays allowed)."""
    _write_atomic(path, "w", lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=_to_builtin) + "\n"))


def write_npy_atomic(path: str, array: np.ndarray) -> None:
    """``np.save`` of ``array`` at ``path`` (no suffix added), written atomically."""
    _write_atomic(path, "wb", lambda f: np.save(f, array))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """``data`` at ``path``, written atomically."""
    _write_atomic(path, "wb", lambda f: f.write(data))


def write_text_atomic(path: str, text: str) -> None:
    """``text`` at ``path``, written atomically."""
    _write_atomic(path, "w", lambda f: f.write(text))


def write_npz_atomic(path: str, **arrays) -> None:
    """``np.savez`` of ``arrays`` at ``path`` (no suffix added), written atomically."""
    _write_atomic(path, "wb", lambda f: np.savez(f, **arrays))


def read_signed(path: str, signature) -> object | None:
    """The result :func:`write_signed` saved at ``path``, if it was saved under an equal
    ``signature`` (compared as JSON: tuples equal lists), else None. A finished piece of work is
    reused only when everything that shaped it is unchanged, so a changed setting is recomputed."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("signature") != as_read_back(signature):
        return None
    return saved["result"]


def as_read_back(obj):
    """``obj`` as :func:`write_json_atomic` would read back: tuples as lists, numpy scalars as numbers."""
    return json.loads(json.dumps(obj, default=_to_builtin))


def write_signed(path: str, signature, result) -> None:
    """``{"signature": signature, "result": result}`` as JSON at ``path``, atomically (see :func:`read_signed`)."""
    write_json_atomic(path, {"signature": signature, "result": result})


def _to_builtin(x):
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x).tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        image = ((image - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str, image: np.ndarray) -> None:
    """An (H, W), (H, W, 1) or (H, W, 3) image as a PNG file, written atomically; floats are rescaled
    to 0-255."""
    write_bytes_atomic(path, _png(image))


def _logged_scalars(logdir: str):
    """(name, step, value) of every scalar in the TensorBoard event files of ``logdir``, in the
    order written; an unreadable file (a truncated last record of a killed run) stops at its damage."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    files = sorted((f for f in os.listdir(logdir) if "tfevents" in f),
                   key=lambda f: os.path.getmtime(os.path.join(logdir, f)))
    for name in files:
        try:
            for record in RawEventFileLoader(os.path.join(logdir, name)).Load():
                event = event_pb2.Event.FromString(record)
                for value in event.summary.value:
                    if value.WhichOneof("value") == "simple_value":
                        yield value.tag, int(event.step), float(value.simple_value)
        except Exception:  # noqa: BLE001 - a damaged tail ends that file's history, not the run
            continue


class MetricWriter:
    """Scalars and images to TensorBoard under `logdir`, and a history kept for plots/results.

    The history starts with the scalars already in `logdir` (an earlier attempt of a resumed run),
    and a scalar logged at a step the history already passed replaces the entries from that step
    on (the resumed run redoes the steps after its checkpoint): plots show the whole run once."""

    def __init__(self, logdir: str | None):
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._writer = None
        if logdir and jax.process_index() == 0:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            os.makedirs(logdir, exist_ok=True)
            for name, step, value in _logged_scalars(logdir):
                self._record(name, step, value)
            self._writer = EventFileWriter(logdir)

    def _record(self, name: str, step: int, value: float) -> None:
        series = self.history[name]
        if series and series[-1][0] >= step:
            series[:] = [(s, v) for s, v in series if s < step]
        series.append((step, value))

    def _event(self, step: int, values):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=values)
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        values = []
        for name, value in scalars.items():
            value = float(value)
            self._record(name, int(step), value)
            values.append(summary_pb2.Summary.Value(tag=name, simple_value=value))
        if self._writer:
            self._event(step, values)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images as (H, W), (H, W, 1) or (H, W, 3) arrays; floats are rescaled to 0-255."""
        if not self._writer:
            return
        from tensorboard.compat.proto import summary_pb2

        values = []
        for name, image in images.items():
            image = np.asarray(image)
            png = _png(image)
            channels = 1 if image.ndim == 2 else image.shape[-1]
            values.append(summary_pb2.Summary.Value(tag=name, image=summary_pb2.Summary.Image(
                height=image.shape[0], width=image.shape[1], colorspace=channels, encoded_image_string=png)))
        self._event(step, values)

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """(N, H, W, C) -> one (rows*H, columns*W, C) image for TensorBoard."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid
