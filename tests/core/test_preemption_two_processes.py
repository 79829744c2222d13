"""SIGTERM to one process of a two-process run: both stop at the same step JAX's preemption sync
agrees on, with that step checkpointed, exit 75, and the same command resumes to the end, with every
array of the final checkpoint (parameters, optimizer state, BatchNorm statistics) bit-identical to an
uninterrupted two-process run's."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 200


def launch(workdir, port, index, log):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(index), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-m", "experiments.train_classifier", "--config",
                             "configs/train_classifier.py:smoke", f"--config.train.steps={STEPS}",
                             "--config.train.checkpoint_every=100", "--config.train.log_every=50",
                             f"--workdir={workdir}"], cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def final_checkpoint(workdir):
    """Every array of the checkpoint at STEPS, on this process's first device, by path."""
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"), item_handlers=ocp.StandardCheckpointHandler())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          manager.item_metadata(STEPS))
    arrays = manager.restore(STEPS, args=ocp.args.StandardRestore(target))
    manager.close()
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(arrays)[0]}


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # about 2 minutes: two JAX processes train, stop and resume, then train again straight
def test_sigterm_to_one_process_stops_both_at_one_checkpointed_step_and_the_rerun_finishes(tmp_path):
    workdir = tmp_path / "run"
    port = free_port()
    procs = [launch(workdir, port, i, tmp_path / f"p{i}.log") for i in range(2)]
    deadline = time.monotonic() + 120
    while not (workdir / "tb").exists() and time.monotonic() < deadline:  # training has started
        time.sleep(0.5)
    time.sleep(5)
    procs[1].send_signal(signal.SIGTERM)
    sent = time.monotonic()
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [75, 75] and time.monotonic() - sent < 30, [open(tmp_path / f"p{i}.log").read()[-800:] for i in (0, 1)]
    stopped = [re.search(r"stopped by SIGTERM after step (\d+); its checkpoint is saved",
                         open(tmp_path / f"p{i}.log").read()) for i in range(2)]
    assert stopped[0] and stopped[1] and stopped[0][1] == stopped[1][1]      # one step on both processes
    assert stopped[0][1] in os.listdir(workdir / "checkpoints")
    port = free_port()
    again = [launch(workdir, port, i, tmp_path / f"r{i}.log") for i in range(2)]
    assert [p.wait(timeout=300) for p in again] == [0, 0]
    assert (workdir / "results.json").exists()
    port = free_port()
    straight = [launch(tmp_path / "straight", port, i, tmp_path / f"s{i}.log") for i in range(2)]
    assert [p.wait(timeout=300) for p in straight] == [0, 0]
    resumed, uninterrupted = final_checkpoint(workdir), final_checkpoint(tmp_path / "straight")
    assert resumed.keys() == uninterrupted.keys() and any("['mean']" in k for k in resumed)  # BatchNorm's
    differ = [k for k in resumed if not np.array_equal(resumed[k], uninterrupted[k])]
    assert not differ, f"{len(differ)} of {len(resumed)} arrays differ, e.g. {differ[:3]}"
