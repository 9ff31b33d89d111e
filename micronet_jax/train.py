"""The training loop: the side effects (data, checkpoints, logs, validation, signals) around the core.

The program itself (model, optimizer, the pure step, the mesh, the shardings, the compiled step) is
:class:`micronet_jax.core.Trainer`. :func:`train_and_evaluate` takes the workdir, resumes or
initialises the state, and runs :class:`_Loop`: one step after another with the periodic actions
(log, validate, checkpoint, stop on a signal or the time limit), then the end-of-run rule, written
once in :meth:`_Loop.finish`: the final validation and the final checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import jax
import ml_collections
from tqdm.auto import tqdm

from micronet_jax import checkpointing, cli, preemption
from micronet_jax import workdir as workdir_lib
from micronet_jax.core import Trainer, TrainState, global_batch
from micronet_jax.evaluate import format_hausdorff
from micronet_jax.reporting import MetricWriter, write_training_plot

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf; the last good checkpoint is left untouched."""


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts JAX's multi-host runtime when configured (must precede any other JAX call).

    With no coordinator given, ``jax.distributed.initialize()`` auto-detects Cloud TPU and SLURM.
    """
    d = config.distributed
    if not d.initialize:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
    if (config.platform or os.environ.get("JAX_PLATFORMS", "")) == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def itstime(step: int, every: int) -> bool:
    """True every ``every`` steps (0 = never), big_vision's ``itstime`` without the last-step case:
    what happens at the end of the run is :meth:`_Loop.finish`'s, in one place."""
    return bool(every) and step % int(every) == 0


# ---------------------------------------------------------------------------------------- entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds checkpoints), validates, and writes reports.

    Returns the final validation summary (GlaS metrics), the last step, whether the run finished,
    and what stopped it early (``stopped_by``: ``"time limit"`` for ``train.time_limit_seconds``,
    ``"SIGTERM"`` / ``"SIGINT"`` for a signal; None when it finished). An early stop always leaves a
    checkpoint of the step it stopped at, so rerunning the same command resumes there.

    Before anything in the workdir changes, the run takes the workdir's lock (one run per workdir,
    process 0 in multi-host runs) and, when resuming, compares the saved config with ``config``
    (:func:`micronet_jax.workdir.resume_changes`): a changed model or optimizer is refused.
    """
    maybe_initialize_distributed(config)
    workdir = workdir_lib.check_path(workdir)
    with contextlib.ExitStack() as guards:
        workdir_lib.lock_for_run(workdir, guards)
        stop = guards.enter_context(preemption.StopRequest())
        return _train(config, workdir, stop)


def _restore_or_init(trainer: Trainer, ckpt_dir: str, data_iter: Any, workdir: str) -> TrainState:
    """The newest readable checkpoint's state (damaged newer folders are moved aside), else a fresh one."""
    target = trainer.restore_target()
    step, state, damaged = checkpointing.restore_newest_readable(
        ckpt_dir, lambda s: checkpointing.restore_state(ckpt_dir, s, target, data_iter))
    for bad, why in damaged:
        # Out of orbax's way (it would refuse to open the folder or to save that step again), kept.
        where = checkpointing.set_aside(ckpt_dir, bad) if jax.process_index() == 0 else "(process 0)"
        logger.warning("checkpoint folder %s cannot be read (%s): moved it to %s (nothing is deleted) "
                       "and resumed from step %d instead", os.path.join(ckpt_dir, str(bad)), why,
                       where, step)
    if damaged and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("damaged checkpoints set aside")
    if step is None:
        return trainer.initial_state()
    logger.info("resumed from step %d in %s", step, workdir)
    return state


def _train(config: ml_collections.ConfigDict, workdir: str, stop: preemption.StopRequest) -> dict[str, Any]:
    from micronet_jax.data.pipeline import TrainSource, make_train_dataset

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if checkpointing.step_folders(ckpt_dir):
        workdir_lib.check_resume(config, workdir, ckpt_dir)
    trainer = Trainer(config)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logger.info(
        "devices: %d (%s) in %d process(es); global batch %d, per process %d, per device %d; "
        "%d steps of %d per epoch",
        jax.device_count(), jax.devices()[0].platform, jax.process_count(),
        config.train.batch_size, config.train.batch_size // jax.process_count(),
        config.train.batch_size // jax.device_count(), trainer.total_steps, trainer.steps_per_epoch,
    )
    if jax.devices()[0].platform == "cpu":
        logger.info("glibc malloc %s transparent huge pages (config.cpu_hugepages, cli.py)",
                    "with" if cli.malloc_hugepages() else "without")
    # Data: every process builds the same source and reads its own disjoint slice of each batch.
    source = TrainSource.for_training(config.data)
    val_examples = validation_examples(config)
    data_iter = iter(make_train_dataset(
        source, config.data, global_batch_size=int(config.train.batch_size),
        seed=int(config.seed), process_index=jax.process_index(),
        process_count=jax.process_count(), crop_size=int(config.data.crop_size),
    ))
    manager = None
    try:
        state = _restore_or_init(trainer, ckpt_dir, data_iter, workdir)
        manager = checkpointing.make_manager(ckpt_dir, keep=int(config.train.keep_checkpoints))
        return _Loop(config, workdir, trainer, data_iter, val_examples, manager, stop).run(state)
    finally:
        if manager is not None:
            # Orbax's writer threads end here, before any error reaches the user as one line.
            manager.wait_until_finished()
            manager.close()
        close = getattr(data_iter, "close", None)
        if close is not None:  # Stops grain's worker processes and prefetch threads.
            close()


# ----------------------------------------------------------------------------------------- loop


class _Loop:
    """One run of steps with its periodic actions; :meth:`finish` is the end-of-run rule."""

    def __init__(self, config, workdir, trainer, data_iter, val_examples, manager, stop):
        self.config, self.workdir, self.trainer = config, workdir, trainer
        self.data_iter, self.val_examples, self.manager, self.stop = data_iter, val_examples, manager, stop
        self.total = trainer.total_steps
        self.is_main = jax.process_index() == 0
        self.summary: dict[str, Any] | None = None
        self.val_f1: float | None = None
        self.validated_at = -1
        self.pending: tuple[int, dict[str, jax.Array]] | None = None  # The last step's metrics.

    def run(self, state: TrainState) -> dict[str, Any]:
        self.state, self.start = state, int(state.step)
        self.writer = MetricWriter(self.workdir, resume_step=self.start)
        self.bar = tqdm(total=self.total, initial=self.start, desc="train", unit="step",
                        disable=not self.is_main, dynamic_ncols=True)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.loop_start = time.perf_counter()
        try:
            for step in range(self.start, self.total):
                stopped_by = self.step(step + 1)
                if stopped_by:
                    return self.stopped(step + 1, stopped_by)
            return self.finish()
        finally:
            self.bar.close()
            self.writer.close()

    def step(self, done: int) -> str | None:
        """Step ``done - 1`` -> ``done`` and the periodic actions due after it; what stops the run."""
        # While step N-1 still runs on the device, the host takes the next batch from grain's
        # workers and starts its (asynchronous) copy to the device: the device never waits for the
        # host as long as that takes less than a step.
        batch = global_batch(next(self.data_iter), self.trainer.mesh)
        self.state, metrics = self.trainer.train_step(self.state, batch)
        if self.pending is not None:  # Check the previous step while this one runs: no host sync.
            self.log()
        self.pending = (done, metrics)
        self.window_steps += 1
        self.bar.update(1)
        if done < self.total:  # The last step's validation and checkpoint are finish()'s.
            eval_now = itstime(done, self.config.train.eval_every)
            # A validated step is always saved, so BestN can keep the best one by object F1.
            save_now = itstime(done, self.config.train.checkpoint_every) or eval_now
            if save_now:
                self.check()  # Never checkpoint or validate weights that came from a NaN step.
            if eval_now and self.val_examples:
                self.validate(done, final=False)
            if save_now:
                self.save(done)
        # Asked every step: in multi-process runs it is JAX's preemption sync point.
        signalled = self.stop.should_stop(done)
        if done == self.total:
            return None
        if signalled:
            return self.stop.name
        limit = self.config.train.time_limit_seconds
        if limit and time.perf_counter() - self.loop_start > limit:
            return "time limit"
        return None

    def finish(self) -> dict[str, Any]:
        """The end of the run: the last step's log, the final validation (with the reports) and the
        final checkpoint, each once. Signalled before the final validation, the run keeps the last
        step and leaves the validation to the rerun (a finished run's rerun re-validates)."""
        if self.pending is not None:
            self.log(force=True)
        end = int(self.state.step)
        if self.stop.signum is not None and self.val_examples and self.validated_at != end:
            return self.stopped(end, self.stop.name)
        if self.val_examples and self.validated_at != end:
            self.validate(end, final=True)
        if self.manager.latest_step() != end:
            self.save(end)
        self.manager.wait_until_finished()
        if self.is_main and self.val_examples:
            write_training_plot(self.workdir)
        return {"summary": self.summary, "step": end, "finished": True, "stopped_by": None}

    def stopped(self, done: int, reason: str) -> dict[str, Any]:
        """An early stop: the step just taken is checked and checkpointed before the loop ends."""
        if self.pending is not None:
            self.log(force=True)
        if self.manager.latest_step() != done:
            self.save(done)
        self.manager.wait_until_finished()
        if reason == "time limit":
            logger.info("time limit of %.0f s reached at step %d of %d: checkpoint saved; run the "
                        "same command again to resume", self.config.train.time_limit_seconds, done,
                        self.total)
        else:
            logger.info("%s: checkpoint of step %d of %d saved", reason, done, self.total)
        return {"summary": self.summary, "step": done, "finished": False, "stopped_by": reason}

    def check(self) -> dict[str, float]:
        """Fetches the last step's metrics and stops the run on a non-finite loss."""
        s, m = self.pending
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        if not host.pop("finite"):
            raise NonFiniteLossError(
                f"non-finite loss at step {s} (loss={host['loss']}, grad_norm={host['grad_norm']}). "
                f"Training stopped; the last good checkpoint (step {self.manager.latest_step()}) is "
                f"kept in {self.workdir}. Try a lower --config.train.learning_rate or "
                "--config.train.grad_clip_norm."
            )
        return host

    def log(self, force: bool = False) -> None:
        """Checks the last step and, every log_every steps (and the first and last), logs it; a
        step is logged once (``pending`` is cleared)."""
        host, s = self.check(), self.pending[0]
        if force or itstime(s, self.config.train.log_every) or s == self.start + 1:
            elapsed = time.perf_counter() - self.window_start
            rate = self.window_steps * self.config.train.batch_size / max(elapsed, 1e-9)
            host["patches_per_second"] = rate
            self.writer.scalars(s, host, prefix="train/")
            self.bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['learning_rate']:.2e}",
                                 patches_s=f"{rate:.1f}")
            self.window_start, self.window_steps = time.perf_counter(), 0
        self.pending = None

    def save(self, step: int) -> None:
        checkpointing.save_state(
            self.manager, step, self.state, config=self.config, data_iter=self.data_iter,
            val_f1=self.val_f1 if self.validated_at == step else None,
        )

    def validate(self, step: int, final: bool) -> None:
        self.summary = _validate(self.trainer, self.state, self.val_examples, self.config,
                                 self.writer, step, self.workdir, final=final)
        self.val_f1, self.validated_at = self.summary["f1"], step


# ----------------------------------------------------------------------------------- validation


def validation_examples(config: ml_collections.ConfigDict) -> list[Any]:
    """The validation images (the first ``eval.max_images``), or none without a validation split."""
    from micronet_jax.data import load_split

    if config.data.source != "synthetic" and not config.data.val_fraction:
        return []
    examples = load_split(config.data, "val")
    if config.eval.max_images:
        examples = examples[: int(config.eval.max_images)]
    return examples


def _validate(trainer: Trainer, state: TrainState, examples: list[Any],
              config: ml_collections.ConfigDict, writer: MetricWriter, step: int, workdir: str,
              final: bool = False) -> dict[str, Any]:
    """Whole-image tiled validation with the GlaS metrics; the final one also writes reports."""
    from micronet_jax import evaluate, visualize

    out = os.path.join(workdir, "eval_val") if final else None
    result = evaluate.evaluate_examples(
        trainer.eval_forward(state), examples, config.eval, trainer.model.variant,
        # Every process validates (same weights, same result); only process 0 writes files.
        overlay_dir=os.path.join(out, "overlays") if out and jax.process_index() == 0 else None,
        progress=jax.process_index() == 0, scale=float(config.data.scale),
        normalize=str(config.data.normalize),
    )
    s = result["summary"]
    writer.scalars(step, {k: s[k] for k in ("f1", "object_dice", "object_hausdorff", "pixel_dice",
                                            "precision", "recall")}, prefix="val/")
    if config.train.image_summary_every or final:
        ex = examples[0]
        writer.images(step, {
            "val/overlay": visualize.overlay_outlines(ex.image, result["predictions"][0], ex.label),
            "val/prediction": visualize.colorize_labels(result["predictions"][0]),
            "val/ground_truth": visualize.colorize_labels(ex.label),
            "val/input": ex.image,
        })
    logger.info("step %d validation: F1 %.4f, object Dice %.4f, object Hausdorff %s, pixel Dice %.4f",
                step, s["f1"], s["object_dice"], format_hausdorff(s["object_hausdorff"]), s["pixel_dice"])
    if out and jax.process_index() == 0:
        evaluate.write_report(out, "val", result, {"step": step, "workdir": workdir})
    return s
