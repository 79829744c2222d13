"""One process of a two-process run (launched by test_distributed.py): one ResNet-20 train step
on a global batch of 16, this process feeding its 8 rows; prints the loss and a parameter checksum."""
import json
import sys

import numpy as np


def batch(n=16):
    rng = np.random.default_rng(0)
    return {"images": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).astype(np.int32), "mask": np.ones(n, np.float32)}


def one_step(mesh, local_batch):
    import jax
    import optax
    from flax import nnx

    from research.core.mesh import shard_batch, to_local_device
    from research.core.train import classification_loss, create_train_state, jit_train_step, make_train_step, place_on_mesh
    from research.data.augment import make_preprocess
    from research.models import build_model

    model = build_model("resnet20", num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0))
    tx = optax.sgd(0.1, momentum=0.9)
    defs, state = create_train_state(model, tx)
    state, shardings = place_on_mesh(state, mesh)
    loss_fn, _ = classification_loss(make_preprocess([0.5] * 3, [0.25] * 3, 1, True))
    new_state, sums = jit_train_step(make_train_step(defs, tx, loss_fn), shardings, mesh)(state, shard_batch(local_batch, mesh))
    # One program for every leaf's sum (the parameters span both processes; the sums are replicated).
    sums_per_leaf = jax.jit(lambda params: jax.tree.map(lambda x: x.sum(), params))(new_state.params)
    checksum = sum(float(np.asarray(x)) for x in jax.tree.leaves(sums_per_leaf))
    # The same parameters copied to this process's first device (its replica, no collective).
    local = sum(float(np.asarray(x).sum()) for x in jax.tree.leaves(to_local_device(new_state.params)))
    return float(sums["loss"] / sums["count"]), checksum, local


if __name__ == "__main__":
    process_id, port = int(sys.argv[1]), sys.argv[2]
    from research.core.mesh import initialize_distributed, make_mesh
    from research.data.pipeline import process_slice

    initialize_distributed(f"localhost:{port}", 2, process_id)
    full = batch()
    local = {k: process_slice(v) for k, v in full.items()}
    loss, checksum, local_checksum = one_step(make_mesh({"data": -1, "model": 1}), local)
    print(json.dumps({"loss": loss, "checksum": checksum, "local_checksum": local_checksum}))
