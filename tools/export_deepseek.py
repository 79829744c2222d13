"""Exports the student of an X-EcoMLA run (``target deepseek_v3``) as a DeepSeek-V3 checkpoint that
stock transformers loads (vLLM and SGLang as its SERVING.md says), from the run's latest checkpoint.

    python -m tools.export_deepseek --workdir runs/x_ecomla_deepseek --out export/ [--force]

The run's ``config.json`` and ``upcycle.json`` give the student's shape; its tokenizer is the
teacher's. A finished run of ``configs/x_ecomla.py:deepseek`` already holds the same export in
``WORKDIR/deepseek_v3``; this tool serves a run that stopped early, or another output folder.
Then: ``AutoModelForCausalLM.from_pretrained("export/")``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections
from flax import nnx

from research.core import config as config_lib
from research.core import optim
from research.core.checkpoint import Checkpointer
from research.core.train import create_train_state
from research.models.deepseek_hf import mla_llama, save_deepseek_v3
from research.models.pretrained import llama_architecture
from research.upcycling.upcycle import student_mla_config
from research.upcycling.xecomla import XEcoMLA


def _read_json(workdir: str, name: str) -> dict:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        raise config_lib.PathNotFoundError(f"{path} does not exist: --workdir must be a run of experiments.x_ecomla")
    with open(path) as f:
        return json.load(f)


def run_settings(workdir: str) -> XEcoMLA:
    """The run's settings but its data section (the student's shapes do not depend on it, and runs of
    earlier versions named other data keys)."""
    settings = _read_json(workdir, "config.json")
    settings.pop("data", None)
    return config_lib.build(XEcoMLA, ml_collections.ConfigDict(settings))


def restore_student(workdir: str):
    """(student, tokenizer, step) from the latest readable checkpoint of the X-EcoMLA run in ``workdir``."""
    exp = run_settings(workdir)
    if exp.upcycle.target != "deepseek_v3":
        raise config_lib.ConfigError(f"{workdir} was upcycled with target {exp.upcycle.target!r}; only target "
                                     "'deepseek_v3' runs export (configs/x_ecomla.py:deepseek)")
    layout = _read_json(workdir, "upcycle.json")
    teacher_config, tokenizer = llama_architecture(exp.model)  # shapes only: the teacher's weights stay on disk
    mla = student_mla_config(exp.upcycle, teacher_config, layout["kv_rank"][0], layout["q_rank"][0] or 0)
    skeleton = mla_llama(teacher_config, mla)  # shapes only: every array comes from the checkpoint
    tx = optim.make_optimizer(exp.optim, exp.train.steps)
    defs, state = create_train_state(skeleton, tx, exp.distill.trainable_filter(), exp.seed)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), 1)
    if checkpointer.latest_step() is None:
        checkpointer.close()
        raise config_lib.PathNotFoundError(f"{workdir}/checkpoints holds no checkpoint to export")
    state = checkpointer.restore(state)
    checkpointer.close()
    student = nnx.merge(defs.eval, state.params, state.frozen, state.rest)
    return student, tokenizer, int(state.step)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="an X-EcoMLA run with target deepseek_v3")
    parser.add_argument("--out", required=True, help="output directory (the Hugging Face checkpoint)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--max-position-embeddings", type=int, default=8192,
                        help="the context length engines allow (vLLM caps max_model_len there)")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out) and not args.force:
            raise config_lib.ConfigError(f"--out {args.out} exists; pass --force to overwrite it")
        student, tokenizer, step = restore_student(args.workdir)
        out = save_deepseek_v3(student, args.out, tokenizer, force=args.force,
                               max_position_embeddings=args.max_position_embeddings)
    except (config_lib.ConfigError, config_lib.PathNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported step {step} of {args.workdir} to {out} (see {os.path.join(out, 'SERVING.md')})")
    return out


if __name__ == "__main__":
    main()
