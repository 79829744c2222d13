"""Dropout models per second: vmapped over masks vs one model at a time.

    python -m tools.bench.dropout_models [--model resnet20|mlp] [--models 64] [--chunk 16]
                                         [--points 500] [--kind bernoulli] [--rate 0.05] [--out FILE.json]

Both ways evaluate the same ``--models`` dropout models (research/multiplicity/dropout.py) of a
freshly initialised classifier (eval mode; the cost does not depend on the weights) on the same
``--points`` random CIFAR-shaped images (28x28 for the MLP): ``serial`` calls the jitted forward
with one key per call, ``vmapped`` with ``--chunk`` keys per call. Each is compiled by a warm-up
call first, so the timing is the steady state. Prints models/s of each and their ratio.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from research.models import build_model
from research.multiplicity.dropout import DropoutEnsemble


def _keys(n: int) -> jax.Array:
    return jax.vmap(lambda j: jax.random.fold_in(jax.random.PRNGKey(0), j))(np.arange(n))


def models_per_second(ensemble: DropoutEnsemble, keys, rate: float, x: np.ndarray, y: np.ndarray) -> float:
    ensemble.evaluate(keys[:ensemble.models_per_chunk], rate, x, y)  # compile
    start = time.perf_counter()
    ensemble.evaluate(keys, rate, x, y)
    return len(keys) / (time.perf_counter() - start)


def measure(model_name: str = "resnet20", models: int = 64, chunk: int = 16, points: int = 500,
            kind: str = "bernoulli", rate: float = 0.05) -> dict:
    shape = (32, 32, 3) if model_name != "mlp" else (28, 28, 1)
    kwargs = {"hidden_sizes": (256, 128)} if model_name == "mlp" else {}
    model = build_model(model_name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0), **kwargs)
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(points, *shape)).astype(np.float32)
    y = rng.integers(0, 10, points)
    keys = _keys(models)
    serial = models_per_second(DropoutEnsemble(model, kind, models_per_chunk=1, batch_size=points), keys, rate, x, y)
    vmapped = models_per_second(DropoutEnsemble(model, kind, models_per_chunk=chunk, batch_size=points),
                                keys, rate, x, y)
    return {"model": model_name, "models": models, "chunk": chunk, "points": points, "kind": kind, "rate": rate,
            "serial_models_per_s": serial, "vmapped_models_per_s": vmapped, "vmapped_over_serial": vmapped / serial,
            "device": jax.devices()[0].device_kind}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=("resnet20", "mlp"))
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--kind", default="bernoulli", choices=("bernoulli", "gaussian"))
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    row = measure(args.model, args.models, args.chunk, args.points, args.kind, args.rate)
    print(f"{row['model']} on {row['points']} points, {row['models']} {row['kind']} models: serial "
          f"{row['serial_models_per_s']:.2f} models/s, vmapped (chunk {row['chunk']}) "
          f"{row['vmapped_models_per_s']:.2f} models/s, ratio {row['vmapped_over_serial']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)
    return row


if __name__ == "__main__":
    main()
