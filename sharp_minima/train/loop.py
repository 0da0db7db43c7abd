"""The training loop: ``train(config, workdir)`` trains any config of ``configs/`` and resumes
when the workdir already holds checkpoints of the same run.

Each epoch: steps, hooks on their schedules, the evaluation, the epoch's hooks, a checkpoint
(with the hooks' state); Ctrl-C stops between two steps after saving, NaN/Inf stops with the
step named. The pieces live in the sibling modules (`config`, `steps`, `hooks`, `console`,
`checkpoint`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sharp_minima import data as data_lib
from sharp_minima import files
from sharp_minima.train.checkpoint import Checkpointer, check_resumable, restore_or_init
from sharp_minima.train.config import Setup, config_dict, run_keys, setup
from sharp_minima.train.console import Progress, deferred_interrupt, on_console, plural
from sharp_minima.train.evaluation import Evaluator, evaluate, make_evaluators
from sharp_minima.train.groups import sam_groups
from sharp_minima.train.hooks import (
    Hook,
    LoopContext,
    StopTraining,
    check_hooks,
    conform,
    hook_state,
    load_hook_state,
    run_hooks,
)
from sharp_minima.train.metrics import MetricsBuffer, MetricWriters, log_step_metrics
from sharp_minima.train.optimizer import resolve_optimizer
from sharp_minima.train.steps import (
    TrainLoss,
    TrainState,
    classification_loss,
    fresh_copy,
    make_get_batch,
    make_train_step,
    replicate,
    serialize_collectives,
)
from sharp_minima.train.stopping import should_stop_early, targets_met


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the last completed step was checkpointed; the message
    says where and how to resume."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state, the model, the data and the evaluation history.

    Attributes:
      state: the final `TrainState`.
      model: the Flax model.
      data: the `sharp_minima.data.Dataset`.
      history: the evaluation records.
      final: the last evaluation record.
      resumed_from: the step the run resumed from (0: a fresh run).
      stopped_early: the run stopped by its ``early_stop`` rules.
    """

    state: TrainState
    model: Any
    data: Any
    history: list[dict]
    final: dict
    resumed_from: int
    stopped_early: bool = False


def train(
    config,
    workdir: str,
    *,
    loss_fn: TrainLoss | None = None,
    tx: optax.GradientTransformation | None = None,
    hooks: Sequence[Hook] = (),
    data=None,
    log: Callable[[str], None] | None = None,
    label: str = "",
    init_variables: dict | None = None,
) -> TrainResult:
    """Trains ``config`` into ``workdir``; resumes from the latest checkpoint there.

    Args:
      config: a ``ConfigDict`` of ``configs/`` (see ``configs/base.py``), or a `Setup`
        (`setup`: the config validated once, with the data and model it names already
        built — what a study passes, so nothing is validated or built twice).
      workdir: output folder (config.json, metrics.jsonl, checkpoints/, checkpoint_best/,
        arrays/ written by hooks, tensorboard/ with ``config.tensorboard``).
      loss_fn: a `TrainLoss` ``(params, model_state, batch, key) -> (objective, aux)``
        (default: `classification_loss` of the config's model with its weight decay). Build
        the model with `build_model` to write one.
      tx: an optax transformation (default: `make_optimizer` from the config).
      hooks: `Hook` s called during the loop; they may replace the state.
      data: a preloaded `sharp_minima.data.Dataset` (default: ``load_data(config)``; ignored
        with a `Setup`).
      log: line printer (default: the console, with an in-place progress line on a terminal;
        silent on hosts other than process 0).
      label: prefix of the progress line (e.g. the run's name in a study).
      init_variables: start from these ``{"params": ..., "batch_stats": ...}`` (e.g. another
        run's ``result.state.variables()``) instead of a random initialisation, with a fresh
        optimizer state and step 0; ignored when ``workdir`` has a checkpoint to resume.

    Returns:
      `TrainResult`.

    Raises:
      ConfigError: bad config (before any compilation). DataNotFoundError: no data.
      NonFiniteError: NaN/Inf loss, naming the step.
    """
    main_host = jax.process_index() == 0
    if not main_host:
        log = lambda s: None  # noqa: E731
    run = config if isinstance(config, Setup) else setup(config, data=data)
    lock = files.workdir_lock(workdir, log=log) if main_host else contextlib.nullcontext()
    with lock:
        return _train_locked(run, workdir, loss_fn, tx, hooks, log, label, init_variables)


def _train_locked(run: Setup, workdir, loss_fn, tx, hooks, log, label, init_variables):
    config, data, model, mesh = run.config, run.data, run.model, run.mesh
    main_host = jax.process_index() == 0
    check_resumable(workdir, config)
    check_hooks(hooks)
    n = len(data.x_train)
    steps_per_epoch = n // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    if main_host:
        files.write_json(os.path.join(workdir, "config.json"), config_dict(config))

    tx, lr_fn = resolve_optimizer(config, steps_per_epoch, tx)
    if loss_fn is None:  # decoupled decay is applied by the optimizer, not the loss
        decay = 0.0 if config.optim.get("decoupled") else config.optim.weight_decay
        loss_fn = classification_loss(model, decay)
    init_key, data_key, aug_key = run_keys(config)
    checkpointer = Checkpointer(workdir, config)
    state, resumed_from = restore_or_init(
        checkpointer, model, tx, jnp.asarray(data.x_train[:1]), init_key, mesh, log=log or print
    )
    saved = checkpointer.load_hook_state(resumed_from) if resumed_from else None
    if resumed_from:
        cold = load_hook_state(hooks, saved)
        if cold:
            (log or print)(
                f"{label}the checkpoint at step {resumed_from} holds no state of the hooks "
                f"{', '.join(cold)} (saved by an older version): they start afresh, so the "
                "resumed run may differ slightly from an uninterrupted one"
            )
    if init_variables is not None and not resumed_from:
        # Copies: the training step donates its state, and the caller keeps its arrays.
        params = jax.tree.map(jnp.array, init_variables["params"])
        start = state.replace(
            params=params,
            batch_stats=jax.tree.map(jnp.array, init_variables.get("batch_stats", {})),
            opt_state=fresh_copy(tx.init(params)),
        )
        try:
            state = conform("init_variables", state, start)
        except ValueError:
            raise ValueError(
                "init_variables do not match the model's parameters (structure or shapes)"
            ) from None
    writers = MetricWriters(
        workdir, enabled=main_host, tensorboard=bool(config.get("tensorboard", False))
    )
    # Records logged after the checkpoint are dropped: the resumed run writes them again.
    history = [r for r in writers.truncate_after(resumed_from) if "test/loss" in r]
    progress = Progress(
        total_steps, resumed_from, label=label, enabled=config.progress and main_host, log=log
    )
    if resumed_from >= total_steps:
        progress.message(
            f"{label}already trained: step {resumed_from} of {total_steps} "
            f"({workdir}/checkpoints); nothing to train"
        )
    else:
        if resumed_from:
            progress.message(f"{label}resumed from step {resumed_from} ({workdir}/checkpoints)")
        progress.message(
            f"{label}training {config.model.name} on {data.name} ({data.source}): "
            f"{plural(n, 'example')}, batch {config.batch_size}, {steps_per_epoch} steps/epoch "
            f"x {plural(config.num_epochs, 'epoch')} on {plural(mesh.size, 'device')}"
            + (f" of {jax.device_count()}" if mesh.size < jax.device_count() else "")
            + f" [{jax.devices()[0].platform}]"
        )
    loop = _Loop(
        config=config,
        workdir=workdir,
        model=model,
        data=data,
        mesh=mesh,
        hooks=hooks,
        checkpointer=checkpointer,
        metrics_log=writers,
        progress=progress,
        history=history,
        train_step=make_train_step(
            loss_fn,
            tx,
            mesh,
            lr_fn=lr_fn,
            log_every=config.log_every_steps,
            groups=sam_groups(config),
        ),
        evaluators=make_evaluators(config, model, data, mesh),
        steps_per_epoch=steps_per_epoch,
        data_key=data_key,
        aug_key=aug_key,
    )
    loop.buffer.load_state_dict(saved)  # steps of the last log interval not yet logged
    try:
        state, stopped_early = loop.run(state, resumed_from)
    finally:
        checkpointer.close()
        writers.close()
        progress.close()
    final = history[-1] if history else evaluate(loop.evaluators, state, loop.epoch_of(state))
    return TrainResult(state, model, data, history, final, resumed_from, stopped_early)


@dataclasses.dataclass
class _Loop:
    """The epoch/step loop of `train` (one object so that its pieces share the run's parts)."""

    config: Any
    workdir: str
    model: Any
    data: Any
    mesh: Mesh
    hooks: Sequence[Hook]
    checkpointer: Checkpointer
    metrics_log: MetricWriters
    progress: Progress
    history: list[dict]
    train_step: Callable
    evaluators: dict[str, Evaluator]
    steps_per_epoch: int
    data_key: jax.Array
    aug_key: jax.Array

    def __post_init__(self):
        sampled = log_step_metrics(sam_groups(self.config))  # measured on log steps alone
        self.buffer = MetricsBuffer(self.steps_per_epoch, self.config.log_every_steps, sampled)
        self.get_batch = make_get_batch(self.mesh, self.config.data.augment)
        self.x_train = replicate(self.data.x_train, self.mesh)
        self.y_train = replicate(self.data.y_train, self.mesh)
        self.sync = serialize_collectives(self.mesh)
        self.save_due = False  # a step checkpoint left to the end of the epoch

    def epoch_of(self, state) -> int:
        return int(state.step) // self.steps_per_epoch

    def _context(self, state, step, epoch) -> LoopContext:
        s = self
        parts = (s.steps_per_epoch, s.model, s.data, s.config, s.workdir, s.history)
        return LoopContext(state, step, epoch, *parts)

    def _save(self, state, rec=None):
        """A checkpoint of ``state`` with the hooks' state (and ``rec`` for the best one)."""
        extra = {**hook_state(self.hooks), **self.buffer.state_dict()}
        stateful = extra or any(hasattr(h.fn, "state_dict") for h in self.hooks)
        self.checkpointer.save(state, rec, hook_state=extra if stateful else None)
        self.save_due = False

    def _flush(self, step, epoch):
        rec = self.buffer.flush(step, epoch, self.checkpointer.latest_step())
        if rec is not None:
            rate = self.progress.current_rate(step)
            self.metrics_log.write({**rec, "train/steps_per_sec": rate})
            self.progress.update(step, epoch, self.config.num_epochs, rec)

    def _hooks(self, when, state, step, epoch):
        if not any(h.due(when, step, epoch) for h in self.hooks):
            return state, {}
        return run_hooks(self.hooks, when, self._context(state, step, epoch))

    def _end_of_epoch(self, state, step, epoch) -> tuple[TrainState, bool]:
        """Evaluation, epoch hooks, checkpoint; True when early stopping ends the run."""
        c = self.config
        if epoch % c.eval_every_epochs and epoch != c.num_epochs:
            state, extra = self._hooks("epoch", state, step, epoch)
            if extra:
                self.metrics_log.write({"step": step, "epoch": epoch, **extra})
            if epoch % c.checkpoint.every_epochs == 0 or self.save_due:
                self._save(state)
            return state, False
        rec = evaluate(self.evaluators, state, epoch)
        self.history.append(rec)  # epoch hooks see this evaluation in ctx.history
        state, extra = self._hooks("epoch", state, step, epoch)
        rec.update(extra)
        self.metrics_log.write(rec)
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in rec.items() if on_console(k) and isinstance(v, float)
        )
        rate = self.progress.rate
        rate = f"  ({rate:.1f} steps/s)" if math.isfinite(rate) else ""
        self.progress.message(f"{self.progress.label}epoch {epoch}/{c.num_epochs}: {shown}{rate}")
        self._save(state, rec)
        if should_stop_early(c, self.history):
            why = (
                "reached " + ", ".join(c.early_stop.targets)
                if targets_met(c, rec)
                else f"{c.early_stop.metric} did not improve for {c.early_stop.patience} "
                "evaluations"
            )
            self.progress.message(f"{self.progress.label}early stop: {why}")
            return state, True
        return state, False

    def run(self, state, resumed_from: int) -> tuple[TrainState, bool]:
        with deferred_interrupt() as interrupt:
            self.interrupt = interrupt
            return self._run(state, resumed_from)

    def _run(self, state, resumed_from: int) -> tuple[TrainState, bool]:
        c, spe = self.config, self.steps_per_epoch
        step = resumed_from
        first_step = resumed_from + 1
        # A run that had stopped early stays stopped when the command is run again.
        if resumed_from and should_stop_early(c, self.history):
            self.progress.message(f"already stopped early at step {resumed_from}")
            return state, True
        if not resumed_from:
            state, extra = self._hooks("start", state, 0, 0)
            if extra:
                self.metrics_log.write({"step": 0, "epoch": 0, **extra})
        try:
            for epoch0 in range(resumed_from // spe, c.num_epochs):
                epoch = epoch0 + 1
                perm = data_lib.epoch_permutation(
                    jax.random.fold_in(self.data_key, epoch0),
                    len(self.data.x_train),
                    c.batch_size,
                )
                self.progress.resume(step)
                for i in range(step - epoch0 * spe, spe):
                    batch = self.get_batch(self.x_train, self.y_train, perm, i, self.aug_key, step)
                    state, mets = self.sync(self.train_step(state, batch))
                    step += 1
                    if step == first_step:  # steps/s leaves out the step that compiled
                        jax.block_until_ready(state.step)
                        self.progress.resume(step)
                    self.buffer.add(step, mets)
                    if self.interrupt.requested:  # Ctrl-C: stop here, between two steps
                        raise KeyboardInterrupt
                    if step % c.log_every_steps == 0:
                        self._flush(step, epoch)
                    saving = c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0
                    if saving or any(h.due("step", step, epoch) for h in self.hooks):
                        self._flush(step, epoch)
                        self.progress.pause(state, step)
                        state, extra = self._hooks("step", state, step, epoch)
                        if extra:
                            self.metrics_log.write({"step": step, "epoch": epoch, **extra})
                        # The last step of an epoch is saved after the epoch's hooks, which
                        # may still change the state.
                        self.save_due = saving and step % spe == 0
                        if saving and not self.save_due:
                            self._save(state)
                        self.progress.resume(step)
                self._flush(step, epoch)
                self.progress.pause(state, step)
                state, stop = self._end_of_epoch(state, step, epoch)
                if stop:
                    return state, True
                if self.interrupt.requested:
                    raise KeyboardInterrupt
        except StopTraining as e:
            self._flush(step, step // spe + 1)
            self.progress.message(f"{self.progress.label}stopped by a hook at step {step}: {e}")
            self._save(state)
            return state, True
        except KeyboardInterrupt:
            # Lose nothing: keep the last completed step (if its buffers are still alive).
            try:
                self._save(state)
                where = f"at step {int(state.step)}"
            except Exception:  # the state may have been donated to a step that never finished
                where = (
                    f"at step {step} (resumes from checkpoint {self.checkpointer.latest_step()})"
                )
            raise Interrupted(
                f"{self.progress.label}interrupted {where}; rerun the same command to resume"
            ) from None
        return state, False
