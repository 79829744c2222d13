"""Checkpoint storage: a full disk ends the run in one line and the same command resumes once there is
space; on a gcsfuse mount a finished step is marked by a commit file."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from research.core.checkpoint import Checkpointer, StorageFullError


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root; skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_in_one_line_and_the_run_resumes_after_space_is_freed(small_disk):
    state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=100_000), jnp.float32)}  # 0.4 MB, incompressible
    filler = small_disk / "filler"
    checkpointer = Checkpointer(str(small_disk / "checkpoints"), every_steps=1, keep=5)
    checkpointer.save(1, state)
    checkpointer.wait()
    used = sum(f.stat().st_size for f in small_disk.rglob("*") if f.is_file())
    filler.write_bytes(b"\0" * (2 * 2 ** 20 - used - 200_000))                 # leaves half a checkpoint
    with pytest.raises(StorageFullError) as error:
        checkpointer.save(2, {"w": state["w"] + 1})
        checkpointer.wait()                                                     # Orbax writes in the background
    message = str(error.value)
    assert "\n" not in message and "step 2" in message and "resumes from step 1" in message
    filler.unlink()
    resumed = Checkpointer(str(small_disk / "checkpoints"), every_steps=1, keep=5)  # leftover temp folder removed
    assert resumed.latest_step() == 1
    np.testing.assert_array_equal(resumed.restore(state)["w"], state["w"])
    assert not [d for d in os.listdir(small_disk / "checkpoints") if "tmp" in d]
    resumed.close()


def test_on_the_command_line_a_full_disk_is_one_line_on_stderr_and_exit_2_then_the_same_command_finishes(small_disk):
    # Orbax's abandoned writes once printed ~150 "Event loop is closed" tracebacks before that line.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, "-m", "experiments.train_classifier", "--config", "configs/train_classifier.py:smoke",
               f"--workdir={small_disk / 'run'}"]
    full = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2 and full.stderr.count("\n") == 1, full.stderr[-2000:]
    assert full.stderr.startswith("error: no space left on the device of ")
    subprocess.run(["mount", "-o", "remount,size=30M", str(small_disk)], check=True)
    again = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (small_disk / "run" / "results.json").exists(), again.stderr[-2000:]


def test_a_full_disk_reported_by_orbax_as_a_value_error_is_recognised(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), every_steps=1)

    def full(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write 8031 bytes to file 5: No space left on device")

    monkeypatch.setattr(checkpointer.manager, "save", full)
    with pytest.raises(StorageFullError, match="while saving step 3 .* it starts again"):
        checkpointer.save(3, {"w": jnp.zeros(4)})


def test_on_a_gcsfuse_mount_a_finished_step_carries_a_commit_file_and_restores(tmp_path, monkeypatch):
    from research.core import checkpoint

    assert checkpoint.mount_type("/proc/self") == "proc" and not checkpoint.needs_commit_file(str(tmp_path))
    monkeypatch.setattr(checkpoint, "mount_type", lambda path: "fuse.gcsfuse")
    saver = Checkpointer(str(tmp_path / "checkpoints"), every_steps=1)
    saver.save(1, {"w": jnp.arange(3.0)})
    saver.wait()
    assert "commit_success.txt" in os.listdir(tmp_path / "checkpoints" / "1")
    np.testing.assert_array_equal(saver.restore({"w": jnp.zeros(3)})["w"], [0.0, 1.0, 2.0])
    saver.close()
