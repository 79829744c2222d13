"""Command-line entry for experiments: `python -m experiments.NAME --config configs/NAME.py[:ARG]
--config.key=value --workdir DIR`.

The config file is loaded through ml_collections' config flag; `--config.*` overrides go through
`research.core.config.apply_overrides`, which names a bad key or value in one line. Known user
errors (bad config, missing data, checkpoint mismatch) end the program with that line and exit
status 2, not a traceback; so does a path the user gave that does not exist.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from research.core.config import (ConfigError, DataSourceError, PathNotFoundError, apply_overrides,
                                  split_override_args)
from research.core.mesh import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file: configs/NAME.py[:ARG].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's config, logs, checkpoints and results.")


def user_errors() -> tuple[type[BaseException], ...]:
    # Imported lazily: the checkpoint module (orbax) is heavier than the CLI.
    from research.core.checkpoint import CheckpointMismatchError

    return (ConfigError, PathNotFoundError, DataSourceError, CheckpointMismatchError)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable, default_workdir: str = "runs/latest") -> None:
    """Runs `main(config, workdir)` from the command line, with linear-time tracing of NNX
    Variable writes installed (research/core/tracing.py)."""
    from research.core import tracing

    tracing.install()
    overrides: dict[str, str] = {}

    def parse(argv: list[str]) -> list[str]:
        try:
            rest, found = split_override_args(argv)
            overrides.update(found)
            sys.argv = rest  # ml_collections reads overrides from sys.argv itself; they are ours
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
        try:
            config = apply_overrides(_CONFIG.value, overrides, from_strings=True)
            # Before the experiment touches JAX (many load and check their data before start()).
            initialize_distributed()
            main(config, _WORKDIR.value or default_workdir)
        except user_errors() as e:
            _fail(str(e))

    app.run(entry, flags_parser=parse)
