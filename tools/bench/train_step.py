"""Training-step throughput of our ResNet-20 against the same network in PyTorch, on the same device.

    python -m tools.bench.train_step [--batch 128] [--steps 20] [--rounds 3] [--threads N]

Both sides train the same network from the same weights on the same batch (CIFAR shape
32x32x3, 10 classes): forward in train mode (batch statistics), cross-entropy, backward, SGD
with Nesterov momentum 0.9 and weight decay 5e-4. Rounds alternate between the two frameworks
so that a change in machine load hits both; the median round of each is reported. PyTorch is
timed in both memory layouts (NCHW and channels-last) and the faster one is the baseline.
Prints images/s for each and the ratio ours / PyTorch (> 1: we are faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from research.core.mesh import make_mesh, shard_batch
from research.core.train import classification_loss, create_train_state, jit_train_step, make_train_step, place_on_mesh
from research.models import build_model


def ours(model, images: np.ndarray, labels: np.ndarray, lr: float):
    mesh = make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    # Same update as torch.optim.SGD(momentum=0.9, nesterov=True, weight_decay=5e-4): L2 added to
    # every gradient (biases and BN included, as PyTorch does by default), then Nesterov momentum.
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9, nesterov=True))
    defs, state = create_train_state(model, tx)
    state, shardings = place_on_mesh(state, mesh)
    loss_fn, _ = classification_loss(lambda x, rng, train: x)  # inputs arrive normalised, as for PyTorch
    step = jit_train_step(make_train_step(defs, tx, loss_fn), shardings, mesh)
    batch = shard_batch({"images": images, "labels": labels, "mask": np.ones(len(labels), np.float32)}, mesh)
    holder = {"state": state}

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            holder["state"], sums = step(holder["state"], batch)
        jax.block_until_ready(sums)
        return time.perf_counter() - start

    return run


def torch_side(model_nnx, images: np.ndarray, labels: np.ndarray, lr: float, channels_last: bool,
               device: str = "cpu"):
    import torch

    from tools.bench.torch_resnet import load_from_nnx, torch_resnet20

    model = load_from_nnx(torch_resnet20(10, images.shape[-1]), model_nnx).train().to(device)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        loss.item()  # waits for the device
        return time.perf_counter() - start

    return run


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    # the same device as JAX's: a GPU run compares the two frameworks on the GPU
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)
    model = build_model("resnet20", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    sides = {"ours (JAX/XLA)": ours(model, images, labels, 0.05)}
    for channels_last in (False, True):
        sides[f"PyTorch {torch.__version__} {'channels-last' if channels_last else 'NCHW'}"] = torch_side(
            model, images, labels, 0.05, channels_last, device)

    for run in sides.values():  # compile / warm up
        run(3)
    rounds = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, run in sides.items():
            rounds[name].append(args.batch * args.steps / run(args.steps))
    throughput = {name: statistics.median(r) for name, r in rounds.items()}

    print(f"ResNet-20 training step, batch {args.batch}, 32x32x3, {jax.devices()[0].device_kind} "
          f"({os.cpu_count()} cores; PyTorch on {device}), median of {args.rounds} rounds x {args.steps} steps")
    for name, value in throughput.items():
        print(f"  {name:34s} {value:8.1f} images/s   (rounds: {', '.join(f'{v:.0f}' for v in rounds[name])})")
    baseline = max((v, k) for k, v in throughput.items() if k.startswith("PyTorch"))
    ratio = throughput["ours (JAX/XLA)"] / baseline[0]
    print(f"ratio ours / {baseline[1]}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
