"""Every experiment runs unchanged as a 2-process JAX run (jax.distributed over 2 CPU processes),
launched as a sweep point would be (``tools/sweep.py --processes 2``). Slow: about 1-3 minutes each."""
import json
import os

import pytest

from tools.sweeps import local
from tools.sweeps.points import Point

EXPERIMENTS = sorted(f[:-3] for f in os.listdir("experiments") if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_smoke_config_runs_as_two_processes(name, tmp_path):
    workdir = str(tmp_path / name)
    point = Point(0, {}, workdir, ("-m", f"experiments.{name}", "--config", f"configs/{name}.py:smoke", "--workdir", workdir))
    outcome = local.run_point(point, processes=2, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert outcome.ok, open(point.log).read()[-3000:]
    assert json.load(open(os.path.join(workdir, "results.json")))
    assert "process 1 of 2" in open(os.path.join(workdir, "sweep.p1.log")).read()  # the two joined one run
