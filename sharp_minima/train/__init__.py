"""The trainer: ``train(config, workdir)`` trains any config of ``configs/`` and resumes when
the workdir already holds checkpoints of the same run.

``from sharp_minima import train`` offers every name below; each lives in the module named
after its concept (imported on first use, so ``import sharp_minima.train.hooks`` — as
`sharp_minima.tracking` does — loads neither the loop nor flax):

- `config` — `validate_config`, `check_numbers`, `ConfigError`, `load_data`, `build_model`,
  `run_keys`, `setup` / `Setup` (a config validated once with its data and model built:
  studies hand it to `train` so nothing is validated or built twice).
- `optimizer` — `make_optimizer`, `learning_rate_schedule` (sgd, momentum, nesterov, adam,
  adamw, rmsprop, adagrad; constant, step, cosine, warm-up with the linear scaling rule of
  Goyal et al. 2017, reduce-on-plateau), `resolve_optimizer` (the config's or your own) and
  `epoch_schedule` (a population member's rate or batch size by epoch).
- `groups` — SAM's m-sharpness groups: `sam_groups` (G, from ``config.sam``), `group_pass`
  (the train step's clean pass over the groups, by layers where it applies).
- `steps` — `make_mesh`, `replicate` (data parallel over devices), `TrainState`,
  `classification_loss` (the default `TrainLoss`; any research loss
  ``(params, model_state, batch, key) -> (objective, aux)`` can be passed to `train`),
  `make_train_step` (SAM's m-sharpness groups: ``groups=``), `make_eval_step`, `init_state`,
  `initial_params`.
- `evaluation` — `Evaluator`, `make_evaluators`, `evaluate`: loss and accuracy in evaluation
  mode, one compiled step per example set.
- `hooks` — `Hook`, `HookResult`, `LoopContext`, `ValidationPlateau`, `StopTraining`: a
  hook runs every N steps or epochs, may log scalars, replace the state (e.g. new
  directions in the optimizer state), write arrays with ``ctx.save_arrays``.
- `stopping` — `should_stop_early` (patience, or `targets_met`: training to a fit),
  `parse_target`.
- `console` — `Progress` (the progress line), `plural`, `fmt_time`.
- `metrics` — `MetricsBuffer` (per-step metrics, checked for NaN/Inf: `NonFiniteError`;
  `log_step_metrics`: those the step measures on log steps only),
  `MetricsLog`, `MetricWriters` (metrics.jsonl, and TensorBoard with ``config.tensorboard``).
- `checkpoint` — `Checkpointer` (last + best), `restore_or_init`, `check_resumable`.
- `loop` — `train`, `TrainResult`, `Interrupted`.
- `population` — `Population`: many small copies of one classifier trained at once
  (`sharp_minima.dynamics.PopulationTrainer`), each member with its seed and its
  `epoch_schedule`; evaluations per epoch, a stop at a target loss, a progress line.

Weight decay is the L2 term ``λ/2 ‖w‖²`` added to the loss (kernels and embeddings only), as in
Keskar et al. (2017) and Jastrzębski et al. (2019).
"""

from __future__ import annotations

import importlib

_MODULES = {
    "config": (
        "OPTIMIZERS",
        "SCHEDULES",
        "TRAINING_FIELDS",
        "EVAL_METRICS",
        "ConfigError",
        "Setup",
        "setup",
        "dividing_devices",
        "validate_config",
        "check_numbers",
        "load_data",
        "build_model",
        "run_keys",
        "config_dict",
        "MODELS",
        "get_model",
    ),
    "optimizer": (
        "learning_rate_schedule",
        "epoch_schedule",
        "make_optimizer",
        "resolve_optimizer",
    ),
    "groups": ("sam_groups", "group_pass"),
    "steps": (
        "make_mesh",
        "serialize_collectives",
        "replicate",
        "TrainState",
        "TrainLoss",
        "classification_loss",
        "make_train_step",
        "make_eval_step",
        "make_get_batch",
        "init_state",
        "initial_params",
    ),
    "evaluation": ("Evaluator", "make_evaluators", "evaluate"),
    "hooks": (
        "Hook",
        "HookResult",
        "LoopContext",
        "StopTraining",
        "ValidationPlateau",
        "save_arrays",
        "run_hooks",
        "conform",
    ),
    "stopping": ("should_stop_early", "parse_target", "targets_met"),
    "console": ("Progress", "plural", "fmt_time"),
    "metrics": (
        "NonFiniteError",
        "MetricsBuffer",
        "log_step_metrics",
        "MetricsLog",
        "MetricWriters",
        "TensorBoardLog",
    ),
    "checkpoint": (
        "CheckpointError",
        "Checkpointer",
        "best_metric",
        "restore_checkpoint",
        "restore_or_init",
        "check_resumable",
        "has_checkpoint",
    ),
    "loop": ("train", "TrainResult", "Interrupted"),
    "population": ("Population",),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sharp_minima.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sharp_minima.train.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
