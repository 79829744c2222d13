"""What a sweep says as points finish: one line per point, and the failures with their logs.

    [3/6] 002 ok in 41.2 s | done 3, failed 0, left 3 | elapsed 1:25, about 1:25 left

The estimate is the mean seconds per finished point times the points left, divided by how many
run at once.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time


@dataclasses.dataclass
class Outcome:
    """How one point ended: ``returncode`` 0 is success; ``attempts`` counts engine retries."""
    name: str
    workdir: str
    returncode: int
    seconds: float
    log: str
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def tail(path: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a log ("" when it does not exist)."""
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        text = f.read()
    # Progress bars rewrite one line with carriage returns; keep only what each line ended as.
    rows = [row.rsplit("\r", 1)[-1] for row in text.splitlines()]
    return "\n".join(rows[-lines:])


class Progress:
    def __init__(self, total: int, concurrency: int = 1, stream=None):
        self.total, self.concurrency = total, max(1, concurrency)
        self.outcomes: list[Outcome] = []
        self.start = time.monotonic()
        self.stream = stream or sys.stdout

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def finished(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        done = len(self.outcomes)
        elapsed = time.monotonic() - self.start
        left = self.total - done
        per_point = sum(o.seconds for o in self.outcomes) / done
        status = "ok" if outcome.ok else f"FAILED (exit {outcome.returncode})"
        retried = f" after {outcome.attempts} attempts" if outcome.attempts > 1 else ""
        estimate = f", about {clock(per_point * left / self.concurrency)} left" if left else ""
        print(f"[{done}/{self.total}] {outcome.name} {status}{retried} in {outcome.seconds:.1f} s | "
              f"done {done - len(self.failed)}, failed {len(self.failed)}, left {left} | "
              f"elapsed {clock(elapsed)}{estimate}", file=self.stream, flush=True)
        if not outcome.ok:
            print(f"  log {outcome.log}, last lines:\n" + "\n".join("    " + row for row in tail(outcome.log).splitlines()),
                  file=self.stream, flush=True)
