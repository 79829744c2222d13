"""Two processes joined by jax.distributed compute the same train step as one process, and each
holds a full replica of the parameters it can copy to one local device."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from research.core.mesh import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import distributed_worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process():
    port = str(free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"), str(i), port],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    single = distributed_worker.one_step(make_mesh({"data": 1, "model": 1}, jax.devices()[:1]), distributed_worker.batch())
    for r in results:
        np.testing.assert_allclose(r["loss"], single[0], rtol=1e-5)
        np.testing.assert_allclose(r["checksum"], single[1], rtol=1e-5)
        np.testing.assert_allclose(r["local_checksum"], single[2], rtol=1e-5)
