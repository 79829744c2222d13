"""Command-line entry for experiments: `python -m experiments.NAME --config configs/NAME.py[:ARG]
--config.key=value --workdir DIR`.

The config file is loaded with `research.core.config.load_config` and the `--config.*` overrides go
through `apply_overrides`, which names a bad key or value in one line. Known user errors end the
program with that one line on stderr and exit status 2, not a traceback: a bad config key, value or
preset, a config file or another path the user gave that does not exist, data that is not here, a
checkpoint of other settings, a workdir that cannot be written. Without ``--workdir`` the run goes to
``runs/NAME`` and the first line says so. SIGTERM (a preempted VM) checkpoints the step in flight and
exits with status 75 (EX_TEMPFAIL): the same command resumes.
"""
from __future__ import annotations

import inspect
import logging as pylogging
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from research.core.config import (ConfigError, DamagedFileError, DataSourceError, PathNotFoundError, apply_overrides,
                                  load_config, split_override_args)
from research.core.mesh import initialize_distributed

_CONFIG = flags.DEFINE_string("config", None, "Experiment config file: configs/NAME.py[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's config, logs, checkpoints and results "
                                                "(default: runs/NAME).")


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGTERM with its checkpoint saved; run it again to resume


def user_errors() -> tuple[type[BaseException], ...]:
    # Imported lazily: the checkpoint module (orbax) is heavier than the CLI.
    from research.core.checkpoint import CheckpointMismatchError, StorageFullError

    return (ConfigError, PathNotFoundError, DataSourceError, DamagedFileError, CheckpointMismatchError,
            StorageFullError)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _OutOfSpaceNoise(pylogging.Filter):
    """Drops the log records (with their tracebacks) of Orbax's writer threads and asyncio that
    report a full disk: the run ends with one line that says so (``StorageFullError``)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return "No space left on device" not in text


def _drop_closed_loop_callbacks(report: Callable) -> Callable:
    """A `sys.unraisablehook` that drops the RuntimeError('Event loop is closed') of a callback
    posted to an asyncio loop that has already closed (TensorStore's writes finishing after Orbax
    gave up on a full disk: ~150 tracebacks, nothing left to act on them), and reports the rest."""
    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            report(unraisable)
    return hook


def check_writable(workdir: str) -> None:
    """A `ConfigError` unless ``workdir`` is, or can be made, a folder this process can write; nothing
    is created here (a bad config must leave no folder behind)."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {workdir!r} is a file, not a folder; choose a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir!r} cannot be written ({existing!r} is not writable by this user); "
                          f"choose a folder you can write")


def default_workdir(main: Callable) -> str:
    """``runs/NAME`` for the experiment file ``experiments/NAME.py`` that defines ``main``."""
    return os.path.join("runs", os.path.splitext(os.path.basename(inspect.getfile(main)))[0])


def run(main: Callable) -> None:
    """Runs `main(config, workdir)` from the command line, with linear-time tracing of NNX
    Variable writes installed (research/core/tracing.py)."""
    from research.core import tracing

    tracing.install()
    overrides: dict[str, str] = {}

    def parse(argv: list[str]) -> list[str]:
        try:
            rest, found = split_override_args(argv)
            overrides.update(found)
            return flags.FLAGS(rest)
        except ConfigError as e:
            _fail(str(e))
        except flags.Error as e:
            _fail(str(e).splitlines()[0])

    def entry(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
        if len(argv) > 1:
            _fail(f"unexpected arguments: {' '.join(argv[1:])}")
        if _CONFIG.value is None:
            _fail("--config is required, e.g. --config configs/train_classifier.py:smoke")
        workdir = _WORKDIR.value
        if workdir is None:
            workdir = default_workdir(main)
            print(f"workdir: {workdir} (the default; set --workdir DIR for another)", file=sys.stderr, flush=True)
        from research.core.loop import Preempted

        for name in ("absl", "asyncio"):
            pylogging.getLogger(name).addFilter(_OutOfSpaceNoise())
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)

        try:
            config = apply_overrides(load_config(_CONFIG.value), overrides, from_strings=True)
            check_writable(workdir)
            # Before the experiment touches JAX (many load and check their data before start()).
            initialize_distributed()
            main(config, workdir)
        except user_errors() as e:
            from research.core.checkpoint import StorageFullError

            if isinstance(e, StorageFullError):  # Orbax's failed writer threads would report again at exit
                print(f"error: {e}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(2)
            _fail(str(e))
        except Preempted as e:  # a sweep engine requeues on 75 (EX_TEMPFAIL)
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)

    app.run(entry, flags_parser=parse)
