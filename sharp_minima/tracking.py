"""Curvature and gradient noise along training, as trainer hooks.

`EigenTracker` holds one curvature operator — the Hessian (`sharp_minima.hessian.Curvature`)
of a loss by default, or any `sharp_minima.curvature.Operator` (GGN, Fisher, gradient
covariance of `sharp_minima.operators`; its metric prefix follows it) — whose compiled
Lanczos kernels are reused at every call, and the previous eigenvectors (each call is
warm-started from them, as Jastrzębski et al. (2019) recompute theirs every epoch).
`NoiseTracker` logs the gradient noise (|G|², tr Σ, B_simple, the SGD temperature) and the
batch sharpness beside 2/η on the same time axis; `DistanceFromStart` the distance
‖θ − θ₀‖ travelled from given parameters (Jastrzębski et al.'s "dist." column). Use them

- as a hook of `sharp_minima.train.train`:
  ``train.Hook(tracker, every_steps=20, until_step=400, every_epochs=1)`` (often early in
  training, once per epoch later) — it reads ``ctx.state.variables()`` and writes
  eigenvalues and tridiagonals to ``workdir/arrays/<name>/``; with ``set_directions=True`` it
  also writes the eigenvectors into the optimizer state (`sharp_minima.optim.nudge` and
  friends), so Nudged-SGD follows the current sharpest directions;
- from any JAX loop: ``tracker.measure(params, step)``.

The curvature subset is a `Subset`: a fixed random ~5% of the training set by default, or a
fresh one at every call (``resample=True``), optionally through the training augmentation.
The loss is whatever you pass: `sharp_minima.losses.evaluation_loss(model, weight_decay)`
is the training objective's data term plus the same L2 term, with BatchNorm in evaluation
mode (running statistics), which `EigenTracker.description` states.

A study's trackers come from its config: `curvature_subset` (the subset a curvature section
asks for), `describe_loss` (the curvature loss in words, for reports) and `make_tracker`
(both, with `sharp_minima.losses.evaluation_loss` and the training run's weight decay).

Only jax, numpy, optax (and `sharp_minima.hessian`, the trainer's hook protocol
`sharp_minima.train.hooks`) are imported: not the training loop, not flax.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharp_minima import curvature, gradients, hessian, losses
from sharp_minima import tree_util as tu
from sharp_minima.data import pipeline
from sharp_minima.train.hooks import HookResult


class Subset:
    """The curvature subset of a training set, as stacked batches for `sharp_minima.hessian`.

    ``subset(step) -> (batches, weights)``: the same random examples at every call, or a
    fresh draw of the same size for each ``step`` with ``resample=True``. With ``augment``
    (``augment(key, x) -> x``, e.g. `sharp_minima.data.pipeline.random_crop_flip`) the
    inputs are augmented afresh at each call, as in training. Shapes never change, so a
    `hessian.Curvature` compiles once.

    Args:
      key: key of the draws.
      x, y: the training inputs and labels (host or device arrays).
      fraction: subset size as a fraction of the training set (default 5%, Jastrzębski et
        al.'s ~2,500 of CIFAR-10's 50,000); ``num_examples`` overrides it.
      num_examples: subset size.
      batch_size: examples per batch of the subset (rounded down to whole batches).
      resample: a new subset at every call.
      augment: optional augmentation of the inputs.

    Example:
      >>> import jax, numpy as np
      >>> x, y = np.arange(100.0)[:, None], np.arange(100) % 2
      >>> subset = Subset(jax.random.key(0), x, y, fraction=0.1, batch_size=5, resample=True)
      >>> (b0, w0), (b1, _) = subset(0), subset(1)
      >>> b0["x"].shape, w0.tolist(), bool((b0["x"] != b1["x"]).any()), subset.size
      ((2, 5, 1), [1.0, 1.0], True, 10)
    """

    def __init__(
        self,
        key: jax.Array,
        x,
        y,
        *,
        fraction: float = 0.05,
        num_examples: int | None = None,
        batch_size: int = 256,
        resample: bool = False,
        augment: Callable | None = None,
    ):
        n = len(x)
        size = num_examples if num_examples is not None else int(round(fraction * n))
        if not 1 <= size <= n:
            raise ValueError(
                f"the curvature subset must have 1..{n} examples (the training set), got {size}"
                f" (fraction={fraction}, num_examples={num_examples})"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bs = min(batch_size, size)
        self.num_batches, self.batch_size = size // bs, bs
        self.size = self.num_batches * bs
        self.x, self.y = jnp.asarray(x), jnp.asarray(y)
        self.key, self.resample, self.augment = key, resample, augment
        self._fixed = None if resample else self._draw(key)

    def _draw(self, key):
        return pipeline.subset_indices(key, len(self.x), self.size, self.batch_size)

    def __call__(self, step: int):
        idx = self._draw(jax.random.fold_in(self.key, step)) if self.resample else self._fixed
        batches = pipeline.stack_batches(self.x, self.y, idx)
        if self.augment is not None:
            x = batches["x"]
            flat = x.reshape((-1,) + x.shape[2:])
            aug = self.augment(jax.random.fold_in(jax.random.fold_in(self.key, step), 1), flat)
            batches["x"] = aug.reshape(x.shape)
        return batches, jnp.ones((self.num_batches,))

    def describe(self) -> str:
        """The subset in words, for reports.

        Returns:
          E.g. ``"2500 training examples (fixed random examples)"``.
        """
        how = "a fresh random draw at every call" if self.resample else "fixed random examples"
        aug = ", augmented as in training" if self.augment is not None else ""
        return f"{self.size} training examples ({how}{aug})"


class EigenTracker:
    """Top-k eigenpairs of a curvature matrix on a curvature subset, warm-started call to call.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (its Hessian); for a Flax model
        `sharp_minima.losses.evaluation_loss` (BatchNorm statistics travel in ``params``).
        Or any `sharp_minima.curvature.Operator`, e.g.
        ``operators.GGN(losses.evaluation_model_fn(model), "cross_entropy", wrt="^params/")``.
      batches: the curvature subset: a `Subset` (or any ``step -> (batches, weights)``), or
        fixed stacked batches (`sharp_minima.data.curvature_batches`).
      key: key for the Lanczos start vectors and probes (folded with the step).
      k: number of eigenpairs (Jastrzębski et al. track up to 50).
      weights: per-batch weights of fixed ``batches`` (ragged last batch).
      wrt: which parameters (e.g. ``"^params/"`` for a Flax model's weights) of the Hessian
        of ``loss_fn`` (an operator carries its own).
      name: metric prefix and folder name under ``arrays/`` (default: the operator's name,
        ``"hessian"``, ``"ggn"``, ``"fisher"``, ...).
      tol: eigenvalue tolerance (`Curvature.eigenpairs`).
      stochastic: if > 0, also log a Hutchinson ‖H‖_F and a Hutch++ trace with this many
        HVPs each, with their standard errors.
      set_directions: as a hook, write the eigenvectors into the optimizer state's
        ``directions`` (`sharp_minima.optim.SubspaceState`; the optimizer's K must equal
        ``k``). ``True`` takes ``vectors["params"]``; a callable maps the vectors to the
        params' structure.
      description: what the curvature loss is (stated in reports); the subset's size and
        sampling are appended.

    Each call runs one Krylov sequence (``restart=False`` of `Curvature.eigenpairs`): an
    exactly repeated eigenvalue (rare along training, common in a multi-output model's
    last layer alone) shows once; measure such a spectrum with `eigenpairs` directly.

    Attributes:
      curvature: the `sharp_minima.hessian.Curvature` (``curvature.num_traces`` stays constant
        after the first call).
      history: ``[(step, values), ...]`` of the calls so far (after a resume: from the last
        call before the checkpoint on).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, batch: 0.5 * jnp.sum(p["scale"] * p["w"] ** 2)
      >>> tracker = EigenTracker(loss, None, key=jax.random.key(0), k=2, wrt="w")
      >>> for step in (0, 100):  # e.g. the curvature grows along training
      ...     m = tracker.measure({"w": jnp.zeros(6), "scale": (1 + step / 100) *
      ...                          jnp.arange(1.0, 7.0)}, step)
      >>> round(m["hessian/lambda_1"], 4), round(m["hessian/lambda_2"], 4)
      (12.0, 10.0)
      >>> tracker.curvature.num_traces  # compiled once, warm-started the second time
      1
    """

    def __init__(
        self,
        loss_fn,
        batches,
        *,
        key: jax.Array,
        k: int = 5,
        weights=None,
        wrt=None,
        name: str | None = None,
        tol: float = 1e-4,
        stochastic: int = 0,
        set_directions: bool | Callable = False,
        description: str = "",
    ):
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if stochastic < 0:
            raise ValueError(f"stochastic must be >= 0 (HVPs per estimate), got {stochastic}")
        if isinstance(loss_fn, curvature.Operator):
            if wrt is not None:
                raise ValueError("wrt belongs to the operator: pass it when building it")
            self.curvature = loss_fn
        else:
            self.curvature = hessian.Curvature(loss_fn, wrt=wrt)
        name = self.curvature.name if name is None else name
        self.batches, self.weights, self.key = batches, weights, key
        self.k, self.name, self.tol, self.stochastic = k, name, tol, stochastic
        if set_directions is True:
            set_directions = lambda vectors: vectors["params"]  # noqa: E731
        self.set_directions = set_directions or None
        subset = batches.describe() if isinstance(batches, Subset) else ""
        self.description = "; ".join(filter(None, [description, subset]))
        self.vectors = None
        self._saved_vectors = None  # flat vectors loaded from a checkpoint, placed at next call
        self.history: list[tuple[int, np.ndarray]] = []
        self.last: hessian.Eigenpairs | None = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """What the next call depends on, saved with each checkpoint by the training loop, so
        that a resumed run measures exactly as an uninterrupted one.

        Returns:
          ``vectors`` (k, n), the flat warm-start vectors; ``step``, the last call's
          step; ``values``, its eigenvalues (numpy arrays; empty before the first call).
        """
        if not self.history:
            return {}
        if self.vectors is None:
            flat = self._saved_vectors
        else:
            flat = jax.vmap(self.curvature.objective.flatten)(self.vectors)
        step, values = self.history[-1]
        return {"vectors": flat, "step": np.int64(step), "values": np.asarray(values)}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state_dict`'s output (the vectors are placed in the params' structure
        at the next call).

        Args:
          state: a dict from `state_dict`.
        """
        self.vectors, self._saved_vectors = None, jnp.asarray(state["vectors"])
        self.history = [(int(state["step"]), np.asarray(state["values"]))]

    def subset(self, step: int):
        """The curvature subset of the call at ``step``.

        Args:
          step: the training step (a fresh draw per step with ``resample``).

        Returns:
          ``(batches, weights)``.
        """
        if callable(self.batches):
            return self.batches(step)
        return self.batches, self.weights

    def measure(self, params: Any, step: int) -> dict[str, float]:
        """Measures at ``params`` and remembers the vectors to warm-start the next call.

        Args:
          params: the parameters (the operator's loss takes them as they are).
          step: the training step (picks the subset; logged with the values).

        Returns:
          ``{"<name>/lambda_1".."lambda_k", "<name>/frobenius_topk" (‖H‖_F from the top k,
          Jastrzębski et al. 2019), "<name>/num_hvps", "<name>/seconds"}`` (plus
          ``frobenius``, ``trace`` and their ``_stderr`` with ``stochastic``).
        """
        t0 = time.perf_counter()
        if self.vectors is None and self._saved_vectors is not None:
            self.vectors = jax.vmap(lambda x: self.curvature.objective.unflatten(params, x))(
                self._saved_vectors
            )
            self._saved_vectors = None
        batches, weights = self.subset(step)
        key = jax.random.fold_in(self.key, step)
        out = self.curvature.eigenpairs(
            params,
            batches,
            k=self.k,
            key=key,
            weights=weights,
            init_vectors=self.vectors,
            tol=self.tol,
            # One Krylov sequence per call (no verifying restart, ~10 products saved at every
            # call): a network's spectrum along training is simple in practice; an exact
            # repeat would show once (documented in the class).
            restart=False,
        )
        self.vectors, self.last = out.vectors, out
        self.history.append((step, out.values))
        p = self.name
        metrics = {f"{p}/lambda_{i + 1}": float(v) for i, v in enumerate(out.values)}
        # ||H||_F from the top K (Jastrzebski et al.'s approximation: a lower bound).
        metrics[f"{p}/frobenius_top{self.k}"] = float(np.sqrt(np.sum(out.values**2)))
        hvps = out.num_steps
        if self.stochastic:
            k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
            fro = self.curvature.frobenius_norm(
                params, batches, key=k1, num_matvecs=self.stochastic, weights=weights
            )
            tr = self.curvature.trace(
                params, batches, key=k2, num_matvecs=self.stochastic, weights=weights
            )
            metrics.update(
                {
                    f"{p}/frobenius": fro.value,
                    f"{p}/frobenius_stderr": fro.stderr,
                    f"{p}/trace": tr.value,
                    f"{p}/trace_stderr": tr.stderr,
                }
            )
            hvps += fro.num_matvecs + tr.num_matvecs
        metrics[f"{p}/num_hvps"] = hvps
        metrics[f"{p}/seconds"] = time.perf_counter() - t0
        return metrics

    def __call__(self, ctx):
        """The trainer hook: measures at ``ctx.state.variables()``, saves the eigenvalues,
        residuals and tridiagonal to ``arrays/<name>/<step>.npz`` and, with
        ``set_directions``, returns the state with the new directions."""
        if self.history and self.history[-1][0] == ctx.step:
            return None  # the step and the epoch schedules met at this step
        metrics = self.measure(ctx.state.variables(), ctx.step)
        out = self.last
        ctx.save_arrays(
            self.name,
            values=out.values,
            residuals=out.residuals,
            alphas=out.tridiagonal[0],
            betas=out.tridiagonal[1],
        )
        if self.set_directions is None:
            return metrics
        directions = self.set_directions(out.vectors)
        opt_state = optax.tree_utils.tree_set(ctx.state.opt_state, directions=directions)
        return HookResult(metrics, ctx.state.replace(opt_state=opt_state))


class DistanceFromStart:
    """A hook logging ``distance`` = ‖θ − θ₀‖ (all parameters, Euclidean) from ``params0``,
    e.g. the initialisation (Jastrzębski et al. 2019, Table 1's "dist." column).

    Args:
      params0: the parameters to measure from (a pytree like ``ctx.state.params``).

    >>> import jax.numpy as jnp
    >>> hook = DistanceFromStart({"w": jnp.zeros(2)})
    >>> hook.measure({"w": jnp.array([3.0, 4.0])})
    5.0
    """

    name = "distance"

    def __init__(self, params0):
        self.params0 = params0
        self._jit = jax.jit(lambda p, p0: tu.norm(tu.sub(p, p0)))

    def measure(self, params) -> float:
        """‖params − params0‖.

        Args:
          params: a pytree like ``params0``.

        Returns:
          The distance.
        """
        return float(self._jit(params, self.params0))

    def __call__(self, ctx):
        return {"distance": self.measure(ctx.state.params)}


class NoiseTracker:
    """Gradient noise and batch sharpness along training, on the time axis of the curvature.

    At each call, on the curvature subset: the unbiased |G|², tr Σ and B_simple = tr Σ/|G|²
    from exact per-example moments (`sharp_minima.gradients.GradientNoise`: the layer
    identities of `sharp_minima.per_example` where they apply), smoothed over calls
    by bias-corrected exponential moving averages of |G|² and tr Σ (B_simple is their
    ratio, as McCandlish et al. smooth it); the SGD temperature T = η(1 − B/N)/(B(1 − μ)); and
    the batch sharpness E_B[g_Bᵀ H_B g_B / |g_B|²] over ``num_minibatches`` mini-batches of
    the training batch size drawn from the subset, logged beside 2/η (under SGD it settles
    at 2/η while λ_max stays below it: Andreyev & Beneventano 2024).

    Args:
      loss_fn: the mean loss ``loss_fn(params, batch) -> scalar`` (e.g.
        `sharp_minima.losses.evaluation_loss`).
      batches: the subset: a `Subset` (or any ``step -> (batches, weights)``) or fixed
        stacked batches.
      key: key of the mini-batch draws (folded with the step).
      batch_size: B of training (mini-batches of the batch sharpness; the temperature).
      learning_rate: η: a number or ``step -> η``; as a hook, the optimizer state's
        injected learning rate is used when it has one.
      num_examples: N of the training set (the temperature's 1 − B/N; None: N → ∞).
      momentum: μ of the optimizer (the temperature's 1/(1 − μ)).
      weights, wrt: as for `EigenTracker`.
      ema: the moving averages' decay β (0: no smoothing).
      num_minibatches: mini-batches of the batch sharpness (0: not measured).
      num_probes: 0: exact per-example moments; K >= 2: random projections instead
        (`sharp_minima.gradients.GradientNoise.measure`; fresh probes at every call, which
        the moving averages smooth), cheaper where many leaves fall back to per-example
        gradients in chunks.
      name: metric prefix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (64, 3))
      >>> batches = {"x": x.reshape(2, 32, 3), "y": jnp.zeros((2, 32))}
      >>> loss = lambda w, b: jnp.mean(0.5 * (b["x"] @ w - b["y"]) ** 2)  # H ≈ I
      >>> tracker = NoiseTracker(loss, batches, key=jax.random.key(1), batch_size=8,
      ...                        learning_rate=0.1, num_examples=64)
      >>> m = tracker.measure(jnp.ones(3), 0)
      >>> round(m["noise/noise_scale"], 5), m["noise/two_over_lr"]
      (0.01094, 20.0)
      >>> 0.5 < m["noise/batch_sharpness"] < 2.0  # H_B ≈ I: about 1
      True
    """

    def __init__(
        self,
        loss_fn,
        batches,
        *,
        key: jax.Array,
        batch_size: int,
        learning_rate: float | Callable[[int], float] | None = None,
        num_examples: int | None = None,
        momentum: float = 0.0,
        weights=None,
        wrt=None,
        ema: float = 0.9,
        num_minibatches: int = 8,
        num_probes: int = 0,
        name: str = "noise",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if num_minibatches < 0 or num_minibatches == 1:
            raise ValueError(f"num_minibatches must be 0 or >= 2, got {num_minibatches}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.noise = gradients.GradientNoise(loss_fn, wrt=wrt)
        self.batches, self.weights, self.key = batches, weights, key
        self.batch_size, self.learning_rate = batch_size, learning_rate
        self.num_examples, self.momentum = num_examples, momentum
        self.ema, self.num_minibatches, self.name = ema, num_minibatches, name
        if num_probes < 0 or num_probes == 1:
            raise ValueError(f"num_probes must be 0 (exact) or >= 2, got {num_probes}")
        self.num_probes = num_probes
        self.moments = np.zeros(3)  # EMA of |G|², EMA of tr Σ, number of calls

    def state_dict(self) -> dict[str, np.ndarray]:
        """The moving averages, saved with each checkpoint, for an exact resume.

        Returns:
          ``{"moments": array}`` (empty before the first call).
        """
        return {"moments": self.moments.copy()} if self.moments[2] else {}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state_dict`'s output.

        Args:
          state: a dict from `state_dict`.
        """
        self.moments = np.asarray(state["moments"], np.float64).copy()

    def subset(self, step: int):
        """The curvature subset of the call at ``step``.

        Args:
          step: the training step (a fresh draw per step with ``resample``).

        Returns:
          ``(batches, weights)``.
        """
        if callable(self.batches):
            return self.batches(step)
        return self.batches, self.weights

    def minibatches(self, batches, step: int):
        """The mini-batches of the batch sharpness at ``step``, drawn without replacement from the
        examples of ``batches``.

        Args:
          batches: the subset's stacked batches.
          step: the training step (seeds the draw).

        Returns:
          The mini-batches stacked, every leaf (J, B, ...).

        Raises:
          ValueError: the subset holds fewer examples than one mini-batch.
        """
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batches)
        n = jax.tree.leaves(flat)[0].shape[0]
        if n < self.batch_size:
            raise ValueError(
                f"the subset has {n} examples, fewer than one mini-batch of {self.batch_size}"
            )
        key = jax.random.fold_in(jax.random.fold_in(self.key, step), 2)
        keys = jax.random.split(key, self.num_minibatches)
        idx = jax.vmap(lambda k: jax.random.choice(k, n, (self.batch_size,), replace=False))(keys)
        return jax.tree.map(lambda x: x[idx], flat)

    def _eta(self, step, opt_state=None):
        if opt_state is not None:
            injected = optax.tree_utils.tree_get(opt_state, "learning_rate")
            if injected is not None:
                return float(injected)
        if callable(self.learning_rate):
            return float(self.learning_rate(step))
        return None if self.learning_rate is None else float(self.learning_rate)

    def measure(self, params: Any, step: int, *, opt_state=None) -> dict[str, float]:
        """Measures the gradient noise at ``params`` and updates the moving averages.

        Args:
          params: the parameters.
          step: the training step.
          opt_state: the optimizer state, to read an injected learning rate (for the
            temperature and 2/η).

        Returns:
          ``{"<name>/grad_norm_sq", "trace_cov", "b_simple"`` (smoothed), the same with
          ``_raw`` (this call) and ``b_simple_stderr``, ``"noise_scale"``
          (`sharp_minima.gradients.noise_scale`), ``"two_over_lr", "batch_sharpness",
          "batch_sharpness_stderr", "seconds"}`` (the rate-dependent ones when η is known).
        """
        t0 = time.perf_counter()
        batches, weights = self.subset(step)
        key = jax.random.fold_in(jax.random.fold_in(self.key, step), 3)
        out = self.noise.measure(
            params, batches, weights=weights, num_probes=self.num_probes, key=key
        ).total
        beta = self.ema
        m = self.moments
        m[0] = beta * m[0] + (1 - beta) * out.grad_norm_sq
        m[1] = beta * m[1] + (1 - beta) * out.trace_cov
        m[2] += 1
        correction = 1 - beta ** m[2]
        g2, tr = m[0] / correction, m[1] / correction
        p = self.name
        metrics = {
            f"{p}/grad_norm_sq": g2,
            f"{p}/trace_cov": tr,
            f"{p}/b_simple": tr / g2 if g2 else float("inf"),
            f"{p}/grad_norm_sq_raw": out.grad_norm_sq,
            f"{p}/trace_cov_raw": out.trace_cov,
            f"{p}/b_simple_raw": out.b_simple,
            f"{p}/b_simple_stderr": out.b_simple_stderr,
        }
        eta = self._eta(step, opt_state)
        if eta is not None:
            metrics[f"{p}/noise_scale"] = gradients.noise_scale(
                eta, self.batch_size, self.num_examples, self.momentum
            )
            metrics[f"{p}/two_over_lr"] = 2.0 / eta
        if self.num_minibatches:
            sharp = self.noise.batch_sharpness(params, self.minibatches(batches, step))
            metrics[f"{p}/batch_sharpness"] = sharp.value
            metrics[f"{p}/batch_sharpness_stderr"] = sharp.stderr
        metrics[f"{p}/seconds"] = time.perf_counter() - t0
        return metrics

    def __call__(self, ctx):
        """The trainer hook: measures at ``ctx.state.variables()`` with the optimizer's
        current learning rate."""
        return self.measure(ctx.state.variables(), ctx.step, opt_state=ctx.state.opt_state)


# ------------------------------------------------------------------- trackers from configs


def curvature_subset(config, section, data, key, *, full: bool = False) -> Subset:
    """The curvature subset a config's curvature ``section`` asks for (``fraction``,
    ``num_examples`` (0 = by fraction), ``batch_size``, ``resample``), through the training
    augmentation when ``config.data.augment`` is set.

    Args:
      config: the training config.
      section: its curvature section (e.g. ``config.curvature``).
      data: the `sharp_minima.data.Dataset`.
      key: key of the draws.
      full: every training example (for full-batch gradient descent).

    Returns:
      A `Subset`.

    Raises:
      ValueError: a subset size outside 1..N or ``batch_size < 1`` (`Subset`).
    """
    n = len(data.x_train)
    if full:
        return Subset(
            key, data.x_train, data.y_train, num_examples=n, batch_size=min(section.batch_size, n)
        )
    return Subset(
        key,
        data.x_train,
        data.y_train,
        fraction=section.fraction,
        num_examples=section.num_examples or None,
        batch_size=section.batch_size,
        resample=section.resample,
        augment=pipeline.random_crop_flip if config.data.augment else None,
    )


def describe_loss(config, model, data) -> str:
    """What `sharp_minima.losses.evaluation_loss` of a training run is, in words (for
    reports).

    Args:
      config: the training config.
      model: the Flax model.
      data: the `sharp_minima.data.Dataset`.

    Returns:
      A phrase such as ``"mean cross-entropy; no BatchNorm; dropout off"``.
    """
    parts = ["mean cross-entropy"]
    if config.optim.weight_decay:
        parts.append(f"+ L2 {config.optim.weight_decay:g}/2·‖w‖² (as in training)")
    if config.data.augment:
        parts.append("on augmented inputs (as in training)")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(data.x_train[:1]))
    bn = "batch_stats" in shapes
    bn = "BatchNorm in evaluation mode (running statistics)" if bn else "no BatchNorm"
    return f"{' '.join(parts)}; {bn}; dropout off"


def make_tracker(
    config,
    section,
    data,
    model,
    subset_key,
    key,
    *,
    k: int,
    full: bool = False,
    set_directions: bool | Callable = False,
    name: str = "hessian",
) -> EigenTracker:
    """The `EigenTracker` (top ``k``) of a training run of ``config`` on the curvature subset
    of ``section`` (its ``tol`` and ``stochastic`` too), for the run's objective
    (`describe_loss`).

    Every run of a study passes the same ``subset_key``: the same examples (a 5% subset's
    top eigenvalue varies by ~20% from one draw to another, which would blur comparisons
    between runs); ``key`` (the Lanczos start vectors) is the run's own.

    Args:
      config: the training config.
      section: its curvature section.
      data: the `sharp_minima.data.Dataset`.
      model: the Flax model.
      subset_key: key of the subset's examples.
      key: key of the Lanczos start vectors.
      k: eigenvalues tracked.
      full: the whole training set as the subset.
      set_directions: write the eigenvectors into the optimizer state (NSGD), or a
        function choosing them.
      name: the metrics' prefix.

    Returns:
      An `EigenTracker`.
    """
    return EigenTracker(
        losses.evaluation_loss(model, config.optim.weight_decay),
        curvature_subset(config, section, data, subset_key, full=full),
        key=key,
        k=k,
        wrt="^params/",
        tol=section.tol,
        stochastic=section.stochastic,
        set_directions=set_directions,
        name=name,
        description=describe_loss(config, model, data),
    )
