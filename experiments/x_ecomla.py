"""X-EcoMLA: upcycle a pretrained GQA Llama into MLA (SVD init) and distil it from the original.

    python -m experiments.x_ecomla --config configs/x_ecomla.py[:PRESETS] --workdir DIR

Pipeline: SVD initialisation (research.upcycling.upcycle), optional layer-wise reconstruction of
each MLA layer (research.upcycling.reconstruct, ``reconstruct.steps > 0``), then end-to-end KD.
``train.budget_minutes`` evaluates the held-out set when the KD steps' own time reaches each mark
(model load, evaluation and checkpoints do not count) and ends the run at the last one.

Writes to DIR: config.json, upcycle.json (per-layer kinds, ranks, factorisation errors),
reconstruct.json (per-layer held-out errors before / after), budgets.json (one row per time
budget: minutes, step, tokens, ppl, top1_agreement: means over the held-out sources, and per source
under ``sources``), TensorBoard events (tb/), checkpoints of the student (checkpoints/, resumed when
present), curves.png, heldout.png (perplexity per source against KD steps, the teacher's dashed) and
results.json (kv_values_per_token_teacher
/ _student, kv_ratio, ppl_teacher, ppl_student_init, ppl_student_reconstructed, ppl_student_kd,
top1_agreement_init / _reconstructed / _kd: means over the sources; by_source: the same per source for
teacher / init / reconstructed / kd; data_tokens, train_tokens, budgets, wall_time_s, ...). With
``upcycle.target=deepseek_v3`` (the ``deepseek`` preset) also deepseek_v3/: the distilled student as a
Hugging Face DeepSeek-V3 checkpoint (research.models.deepseek_hf; tools/export_deepseek.py does the
same from any run's latest checkpoint).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

from research.core import cli, experiment, optim, report
from research.core import config as cfg
from research.core.checkpoint import Checkpointer, array_digest
from research.core.loop import fit
from research.core.mesh import batch_sharding, replicated, state_shardings
from research.core.records import MetricWriter, write_json_atomic
from research.core.train import create_train_state, place_on_mesh
from research.data.sources import default_cache_dir
from research.data.text import text_windows
from research.distill import make_kd_train_step
from research.distill.evaluate import lm_metrics_by_source, top1_predictions
from research.models.deepseek_hf import save_deepseek_v3
from research.models.pretrained import load_llama
from research.upcycling.heldout_plot import plot_heldout
from research.upcycling.reconstruct import reconstruct_layers
from research.upcycling.upcycle import upcycle_gqa_to_mla
from research.upcycling.xecomla import XEcoMLA


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(XEcoMLA, config)
    source, data, upcycle, reconstruct, distill = exp.model, exp.data, exp.upcycle, exp.reconstruct, exp.distill
    mesh = experiment.start(config, workdir)

    teacher_config, teacher, tokenizer = load_llama(source, seed=exp.seed, default_cache_root=default_cache_dir())
    rules = exp.mesh.logical
    teacher_graphdef, teacher_state = nnx.split(teacher)
    teacher_shardings = state_shardings(teacher_state, mesh, rules)  # a mesh that cannot hold the heads fails here
    mix = text_windows(data, tokenizer)
    train_windows = mix.train
    print("text mix (training / held-out tokens, sampling weight): " + ", ".join(
        f"{name} {n['train']:,} / {n['heldout']:,}, {w:.2f}" for (name, n), w in zip(mix.tokens().items(), mix.weights)))
    # What decides the student's weights: a workdir holding checkpoints of other settings is refused
    # here, before minutes of upcycling and layer-wise fitting (research/core/checkpoint.py).
    settings = {key: value for key, value in dataclasses.asdict(exp).items()
                if key in ("model", "data", "upcycle", "reconstruct", "distill", "optim")}
    settings.update(seed=exp.seed, data_digest=array_digest(train_windows),
                    train={k: getattr(exp.train, k) for k in ("steps", "batch_size", "grad_accum_steps")})
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), exp.train.checkpoint_every or exp.train.steps,
                                settings=settings)
    if exp.train.budget_minutes and checkpointer.latest_step():
        raise cfg.ConfigError(f"train.budget_minutes times one uninterrupted run, but {workdir} holds a checkpoint at "
                              f"step {checkpointer.latest_step()}; use a new --workdir")
    if reconstruct.steps and len(train_windows) < reconstruct.windows:
        raise cfg.ConfigError(f"config key 'reconstruct.windows' = {reconstruct.windows}: there are only "
                              f"{len(train_windows)} training windows")
    calibration = train_windows[mix.spread(data.calibration_windows, exp.seed), :-1]
    student, upcycle_report = upcycle_gqa_to_mla(teacher, upcycle, calibration)
    if experiment.main_process():
        write_json_atomic(os.path.join(workdir, "upcycle.json"), upcycle_report)

    eval_batch = exp.train.batch_size
    teacher_top1 = {name: top1_predictions(teacher, w, eval_batch) for name, w in mix.heldout.items()}

    def evaluate(model) -> dict:
        """Held-out perplexity and top-1 agreement with the teacher, per source and their means."""
        return lm_metrics_by_source(model, mix.heldout, eval_batch, teacher_top1)

    writer = MetricWriter(os.path.join(workdir, "tb"))
    teacher_eval, init_eval = lm_metrics_by_source(teacher, mix.heldout, eval_batch), evaluate(student)
    print(f"held-out perplexity: teacher {_per_source(teacher_eval)}; student at initialisation {_per_source(init_eval)}")
    layerwise_eval, layerwise_report = init_eval, None
    if reconstruct.steps:
        fitting = train_windows[mix.spread(reconstruct.windows, exp.seed + 1), :-1]
        layerwise_report = reconstruct_layers(teacher, student, fitting, reconstruct, seed=exp.seed,
                                              progress=exp.train.progress)
        if experiment.main_process():
            write_json_atomic(os.path.join(workdir, "reconstruct.json"), layerwise_report)
        layerwise_eval = evaluate(student)
        print(f"after layer-wise reconstruction ({layerwise_report['seconds'] / 60:.1f} min): held-out perplexity "
              f"{_per_source(layerwise_eval)}")
    _write_heldout(writer, 0, layerwise_eval)

    steps = exp.train.steps
    tx = optim.make_optimizer(exp.optim, steps)
    defs, state = create_train_state(student, tx, distill.trainable_filter(), exp.seed)
    state, shardings = place_on_mesh(state, mesh, rules)
    teacher_state = jax.device_put(teacher_state, teacher_shardings)
    kd_step = jax.jit(
        make_kd_train_step(defs, tx, teacher_graphdef, temperature=distill.temperature,
                           ce_weight=distill.ce_weight, accum_steps=exp.train.grad_accum_steps),
        in_shardings=(shardings, teacher_shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)), donate_argnums=0)

    def next_batch(step: int) -> dict[str, np.ndarray]:
        windows = train_windows[mix.draw(np.random.default_rng([exp.seed, step]), exp.train.batch_size)]
        return {"inputs": windows[:, :-1], "labels": windows[:, 1:], "mask": np.ones(windows[:, 1:].shape, np.float32)}

    budgets = []

    def on_budget(state, step: int, seconds: float) -> None:
        """Held-out figures of the student when the KD time reaches a budget."""
        host = jax.device_get(state)
        figures = evaluate(nnx.merge(defs.eval, host.params, host.frozen, host.rest))
        budgets.append({"minutes": seconds / 60, "step": step, "tokens": step * exp.train.batch_size * data.seq_len,
                        **_summary(figures)})
        _write_heldout(writer, step, figures)
        if experiment.main_process():
            write_json_atomic(os.path.join(workdir, "budgets.json"), budgets)
        print(f"\nKD budget {seconds / 60:.1f} min (step {step}): held-out perplexity {_per_source(figures)}, "
              f"top-1 agreement {figures['top1_agreement']:.3f}", flush=True)

    state, train_metrics, _ = fit(
        state, lambda s, batch: kd_step(s, teacher_state, batch), next_batch, steps, mesh=mesh, writer=writer,
        checkpointer=checkpointer, learning_rate=optim.make_schedule(exp.optim, steps),
        log_every=exp.train.log_every, progress=exp.train.progress,
        time_budgets=[60 * m for m in exp.train.budget_minutes], on_budget=on_budget)
    checkpointer.close()

    host = jax.device_get(state)
    distilled = nnx.merge(defs.eval, host.params, host.frozen, host.rest)
    kd_eval = evaluate(distilled)
    final_step = int(jax.device_get(state.step))
    _write_heldout(writer, final_step, kd_eval)
    writer.close()

    kv_teacher, kv_student = teacher.kv_values_per_token(), distilled.kv_values_per_token()
    num_trainable = sum(x.size for x in jax.tree.leaves(host.params))
    results = {
        "kv_values_per_token_teacher": kv_teacher,
        "kv_values_per_token_student": kv_student,
        "kv_ratio": kv_student / kv_teacher,
        "ppl_teacher": teacher_eval["ppl"],
        "ppl_student_init": init_eval["ppl"],
        "ppl_student_reconstructed": layerwise_eval["ppl"],
        "ppl_student_kd": kd_eval["ppl"],
        "top1_agreement_init": init_eval["top1_agreement"],
        "top1_agreement_reconstructed": layerwise_eval["top1_agreement"],
        "top1_agreement_kd": kd_eval["top1_agreement"],
        "reconstruct_s": layerwise_report["seconds"] if layerwise_report else 0.0,
        "budgets": budgets,
        "by_source": {"teacher": _summary(teacher_eval)["sources"], "init": _summary(init_eval)["sources"],
                      "reconstructed": _summary(layerwise_eval)["sources"], "kd": _summary(kd_eval)["sources"]},
        "data_tokens": mix.tokens(),
        "train_loss": train_metrics.get("train/loss"),
        "train_tokens": int(jax.device_get(state.step)) * exp.train.batch_size * data.seq_len,
        "heldout_tokens": sum(n["heldout"] for n in mix.tokens().values()),
        "steps": int(jax.device_get(state.step)),
        "num_trainable_params": int(num_trainable),
        "layer_kinds": upcycle_report["layer_kinds"],
        "kv_rank": upcycle_report["kv_rank"],
        "wall_time_s": experiment.wall_time_s(workdir),
        "devices": experiment.device_summary(mesh),
    }
    if upcycle.target == "deepseek_v3" and experiment.main_process():  # what transformers / vLLM / SGLang load
        try:
            results["export"] = save_deepseek_v3(distilled, os.path.join(workdir, "deepseek_v3"), tokenizer, force=True)
            print(f"exported the student as a DeepSeek-V3 checkpoint: {results['export']}")
        except (OSError, ValueError) as e:  # the run's results are kept; tools/export_deepseek.py retries
            results["export_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"export to {workdir}/deepseek_v3 failed ({results['export_error']}); the results are saved and "
                  f"python -m tools.export_deepseek --workdir {workdir} --out DIR exports the checkpoint",
                  file=sys.stderr)
    if experiment.main_process():
        write_json_atomic(os.path.join(workdir, "results.json"), results)
        report.curves(writer.history, os.path.join(workdir, "curves.png"),
                    title=f"KD of the MLA student (KV {100 * results['kv_ratio']:.1f}% of GQA)")
        plot_heldout(results, os.path.join(workdir, "heldout.png"), data.sources,
                     title=f"held-out perplexity per source, KV {100 * results['kv_ratio']:.1f}% of GQA")
        print(f"KV cache {kv_student}/{kv_teacher} values per token ({100 * results['kv_ratio']:.1f}%); "
              f"held-out perplexity teacher {results['ppl_teacher']:.3f}, student init {results['ppl_student_init']:.3f}, "
              f"after KD {results['ppl_student_kd']:.3f}; top-1 agreement {results['top1_agreement_kd']:.3f}")
    return results


def _summary(figures: dict) -> dict:
    """The figures a record keeps: the means and, per source, perplexity and top-1 agreement."""
    keep = ("ppl", "top1_agreement")
    return {**{k: figures[k] for k in keep if k in figures},
            "sources": {name: {k: m[k] for k in keep if k in m} for name, m in figures["sources"].items()}}


def _per_source(figures: dict) -> str:
    """'mean 41.2 (kjv 30.1, handbook 52.3, ...)'."""
    return f"mean {figures['ppl']:.2f} (" + ", ".join(f"{n} {m['ppl']:.2f}" for n, m in figures["sources"].items()) + ")"


def _write_heldout(writer: MetricWriter, step: int, figures: dict) -> None:
    """The student's per-source held-out perplexity (and mean agreement) as scalars heldout/ppl/<source>."""
    scalars = {f"heldout/ppl/{name}": m["ppl"] for name, m in figures["sources"].items()}
    scalars["heldout/ppl/mean"] = figures["ppl"]
    if "top1_agreement" in figures:
        scalars["heldout/top1_agreement"] = figures["top1_agreement"]
    writer.scalars(step, scalars)


if __name__ == "__main__":
    cli.run(main)
