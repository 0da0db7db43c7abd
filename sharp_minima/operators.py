"""Curvature matrices beyond the Hessian: generalised Gauss–Newton, Fisher (empirical and
Monte-Carlo) and the covariance of the per-example gradients.

Each is a `sharp_minima.curvature.Operator`: the same solvers as the Hessian
(`matvec`, `eigenpairs`, `spectral_density`, `trace`, `frobenius_norm`, `lanczos`), the same
``wrt``, weighted and sharded ``batches`` (a leading axis over batches), and compiled kernels
owned by the object. No Jacobian is ever materialised: every product is one linearisation
of the network (`jax.linearize`, a forward pass) and its transpose (a backward pass).

With per-example losses ℓᵢ(θ) = ℓ(f(θ, xᵢ), yᵢ) of a network f, weights ωᵢ (1/B, or a
``batch["mask"]`` of padded examples normalised to sum one) and Jᵢ = ∂f(θ, xᵢ)/∂θ:

- ``GGN``: G = Σᵢ ωᵢ Jᵢᵀ H_ℓ,ᵢ Jᵢ, H_ℓ,ᵢ the Hessian of ℓ in the outputs (an exact HVP of the
  output loss, which for cross-entropy is diag(p) − ppᵀ). It is positive semi-definite for
  a convex output loss and equals the Hessian when f is linear in θ.
- ``Fisher(kind="empirical")``: F_emp = Σᵢ ωᵢ gᵢgᵢᵀ with gᵢ = ∇ℓᵢ on the true labels.
- ``Fisher(kind="mc")``: F_mc = Σᵢ ωᵢ Jᵢᵀ sᵢsᵢᵀ Jᵢ with sᵢ = ∇_f ℓ(f, ỹᵢ) at labels ỹᵢ drawn
  from the model (`OutputLoss.sample`); E[F_mc] = GGN for cross-entropy and for squared
  error (unit-variance Gaussian).
- ``GradientCovariance``: Σ = Σᵢ ωᵢ gᵢgᵢᵀ − ḡḡᵀ, ḡ = Σᵢ ωᵢ gᵢ: the covariance of one
  example's gradient, the "F(w)" of the SDE picture of SGD; a mini-batch gradient of B
  examples drawn with replacement has covariance Σ/B (see `sharp_minima.gradients`).

Over several batches the per-batch matrices are averaged with the batch weights; Σ is then
the empirical Fisher of all examples minus the outer product of the overall mean gradient.

The model is ``model_fn(params, batch) -> outputs`` (e.g. logits ``(B, C)``; for a Flax
model `sharp_minima.losses.evaluation_model_fn`) and the output loss an `OutputLoss`
(`cross_entropy`, `squared_error`, or your own); the empirical Fisher and Σ only need the
per-example losses, so they also take any mean loss ``loss_fn(params, batch) -> scalar``
(per-example gradients by `vmap` over single examples, as `sharp_minima.gradients` does).
The per-example view assumes examples do not interact (no BatchNorm in training mode).

Only jax and numpy are imported here (not flax).

References:
  Schraudolph (2002) and Martens (2014/2020) for the GGN and its relation to the Fisher;
  Kunstner, Balles & Hennig (2019) on the empirical Fisher; Dangel et al. (curvlinops) for
  the operators' interface; Jastrzębski et al. (2017) and Smith & Le (2018) for Σ in the
  SDE picture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sharp_minima import objective
from sharp_minima.curvature import Operator
from sharp_minima.objective import PyTree, batch_mean, example_weights, per_example_losses

__all__ = [
    "GGN",
    "Fisher",
    "GradientCovariance",
    "OutputLoss",
    "cross_entropy",
    "squared_error",
]

ModelFn = Callable[[PyTree, PyTree], jax.Array]


class OutputLoss(NamedTuple):
    """A loss on a network's outputs.

    Attributes:
      name: e.g. ``"cross_entropy"``.
      per_example: ``per_example(outputs, batch) -> (B,)`` losses.
      sample: ``sample(key, outputs) -> (B, ...)``: the gradient in the outputs of the
        per-example loss at a label drawn from the model's predictive distribution (the
        Monte-Carlo Fisher's sᵢ), or None when the loss is not a likelihood.
    """

    name: str
    per_example: Callable[[jax.Array, PyTree], jax.Array]
    sample: Callable[[jax.Array, jax.Array], jax.Array] | None = None


def cross_entropy(label_key: str = "y") -> OutputLoss:
    """Softmax cross-entropy of logits ``(B, C)`` against integer labels ``batch[label_key]``;
    labels are sampled from softmax(logits) for the Monte-Carlo Fisher (sᵢ = p − onehot(ỹ)),
    and its Hessian in the logits is diag(p) − ppᵀ.

    Args:
      label_key: the batch entry holding the labels.

    Returns:
      An `OutputLoss` for `GGN` and `Fisher`.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = cross_entropy()
      >>> losses = loss.per_example(jnp.zeros((2, 4)), {"y": jnp.array([0, 3])})
      >>> [round(float(v), 4) for v in losses]
      [1.3863, 1.3863]
    """

    def per_example(logits, batch):
        logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
        labels = batch[label_key]
        return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]

    def sample(key, logits):
        y = jax.random.categorical(key, logits)
        return jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)

    return OutputLoss("cross_entropy", per_example, sample)


def squared_error(target_key: str = "y") -> OutputLoss:
    """½‖f − y‖² per example (summed over the output axes), targets ``batch[target_key]``:
    the negative log-likelihood of a unit-variance Gaussian, so sᵢ = −ε, ε ~ N(0, I), for
    the Monte-Carlo Fisher, and H_ℓ = I.

    Args:
      target_key: the batch entry holding the targets.

    Returns:
      An `OutputLoss` for `GGN` and `Fisher`.

    Example:
      >>> import jax.numpy as jnp
      >>> squared_error().per_example(jnp.ones((1, 2)), {"y": jnp.zeros((1, 2))}).tolist()
      [1.0]
    """

    def per_example(outputs, batch):
        diff = outputs - batch[target_key]
        return 0.5 * jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=1)

    def sample(key, outputs):
        return -jax.random.normal(key, outputs.shape, outputs.dtype)

    return OutputLoss("squared_error", per_example, sample)


_OUTPUT_LOSSES = {"cross_entropy": cross_entropy, "squared_error": squared_error}


def _output_loss(output_loss) -> OutputLoss:
    if isinstance(output_loss, OutputLoss):
        return output_loss
    if isinstance(output_loss, str) and output_loss in _OUTPUT_LOSSES:
        return _OUTPUT_LOSSES[output_loss]()
    raise ValueError(
        f"output_loss must be an OutputLoss or one of {sorted(_OUTPUT_LOSSES)}, got {output_loss!r}"
    )


def _check_model_fn(model_fn):
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable, got {type(model_fn).__name__}")


class _ModelObjective(objective.Objective):
    """The mean of an output loss over a model's outputs, as an `objective.Objective` (so
    ``wrt``, validation and raveling are the Hessian's); also the per-example losses."""

    def __init__(self, model_fn, output_loss: OutputLoss, wrt):
        _check_model_fn(model_fn)
        self.model_fn, self.output_loss = model_fn, output_loss

        def loss_fn(params, batch):
            losses = output_loss.per_example(model_fn(params, batch), batch)
            return jnp.sum(example_weights(batch, losses.shape[0], losses.dtype) * losses)

        super().__init__(loss_fn, wrt)

    def prepare(self, params, batches, weights=None):
        one = None if batches is None else jax.tree.map(lambda x: x[0], batches)
        out = jax.eval_shape(self.model_fn, params, one)
        if not hasattr(out, "shape") or len(out.shape) < 1:
            raise ValueError(
                "model_fn must return one array of outputs with a leading example axis, got "
                f"{jax.tree.map(lambda s: s.shape, out)}"
            )
        losses = jax.eval_shape(self.output_loss.per_example, out, one)
        if getattr(losses, "shape", None) != out.shape[:1]:
            raise ValueError(
                f"output_loss {self.output_loss.name!r} must return one loss per example, shape "
                f"{out.shape[:1]}, got {getattr(losses, 'shape', type(losses).__name__)}"
            )
        return super().prepare(params, batches, weights)


def _objective(fn, output_loss, wrt) -> objective.Objective:
    """A mean loss ``fn(params, batch)`` (``output_loss=None``), or a model ``fn`` with an
    output loss, as the operator's objective."""
    if output_loss is None:
        _check_model_fn(fn)
        return objective.Objective(fn, wrt)
    return _ModelObjective(fn, _output_loss(output_loss), wrt)


class GGN(Operator):
    """The generalised Gauss–Newton matrix G = Σᵢ ωᵢ Jᵢᵀ H_ℓ,ᵢ Jᵢ of a model and output loss.

    One product is a linearisation of the network (forward), an HVP of the output loss in the
    outputs (tiny) and the transposed linearisation (backward): no second-order pass through
    the network, unlike a Hessian-vector product.

    Args:
      model_fn: ``model_fn(params, batch) -> outputs (B, ...)``.
      output_loss: an `OutputLoss`, ``"cross_entropy"`` or ``"squared_error"``.
      wrt: which parameters (`sharp_minima.objective.Objective`).
      chunk: products evaluated at once by `trace`, `frobenius_norm` and residual checks.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = lambda w, batch: batch["x"] @ w  # linear: the GGN is the Hessian
      >>> batches = {"x": jnp.eye(3)[None] * jnp.array([1.0, 2.0, 3.0]),
      ...            "y": jnp.zeros((1, 3, 3))}
      >>> ggn = GGN(model, "squared_error")
      >>> top = ggn.eigenpairs(jnp.zeros((3, 3)), batches, k=1, key=jax.random.key(0))
      >>> round(float(top.values[0]), 4)  # 3² / 3 examples
      3.0
    """

    name = "ggn"
    products = "Gauss-Newton-vector products"

    def __init__(self, model_fn: ModelFn, output_loss="cross_entropy", *, wrt=None, chunk=8):
        super().__init__(_ModelObjective(model_fn, _output_loss(output_loss), wrt), chunk=chunk)

    def flat_matvec(self, params, batches, weights, operands=None):
        obj = self.objective
        x0, place = obj.split(params)
        loss = obj.output_loss

        def one(v, batch):
            out, jvp = jax.linearize(lambda x: obj.model_fn(place(x), batch), x0)
            omega = example_weights(batch, out.shape[0], out.dtype)

            def mean_loss(o):
                return jnp.sum(omega * loss.per_example(o, batch))

            h_jv = jax.jvp(jax.grad(mean_loss), (out,), (jvp(v),))[1]
            return jax.linear_transpose(jvp, x0)(h_jv)[0]

        return x0, lambda v: batch_mean(lambda b: one(v, b), batches, weights)


class Fisher(Operator):
    """The Fisher information of a model: empirical (true labels) or Monte-Carlo (labels
    drawn from the model).

    Args:
      model_fn: ``model_fn(params, batch) -> outputs``; or, for ``kind="empirical"`` only,
        any mean loss ``loss_fn(params, batch) -> scalar`` with ``output_loss=None``.
      output_loss: an `OutputLoss`, ``"cross_entropy"`` or ``"squared_error"``.
      kind: ``"empirical"``: F = Σᵢ ωᵢ gᵢgᵢᵀ; ``"mc"``: F = Σᵢ ωᵢ Jᵢᵀ sᵢsᵢᵀ Jᵢ averaged over
        ``num_samples`` draws per example.
      key: the draws of ``kind="mc"`` (fixed per object, so the operator is one symmetric
        matrix for Lanczos; batch b uses ``fold_in(key, b)``).
      num_samples: draws per example for ``kind="mc"``.
      wrt, chunk: as for `GGN`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w, batch: jnp.mean(0.5 * (batch["x"] @ w - batch["y"]) ** 2)
      >>> batches = {"x": jnp.array([[[1.0, 0.0], [0.0, 1.0]]]), "y": jnp.array([[1.0, 2.0]])}
      >>> fisher = Fisher(loss, None)  # g_1 = (-1, 0), g_2 = (0, -2) at w = 0
      >>> fisher.matvec(jnp.zeros(2), batches, jnp.array([1.0, 1.0])).tolist()
      [0.5, 2.0]
    """

    products = "Fisher-vector products"

    def __init__(
        self,
        model_fn: ModelFn,
        output_loss="cross_entropy",
        *,
        kind: str = "empirical",
        key: jax.Array | None = None,
        num_samples: int = 1,
        wrt=None,
        chunk: int = 8,
    ):
        if kind not in ("empirical", "mc"):
            raise ValueError(f"kind must be 'empirical' or 'mc', got {kind!r}")
        if kind == "mc":
            if key is None:
                raise ValueError("Fisher(kind='mc') needs key= for the sampled labels")
            if output_loss is None or _output_loss(output_loss).sample is None:
                raise ValueError("Fisher(kind='mc') needs an output loss that can sample labels")
            if num_samples < 1:
                raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.kind, self.key, self.num_samples = kind, key, num_samples
        self.name = "fisher" if kind == "empirical" else "fisher_mc"
        super().__init__(_objective(model_fn, output_loss, wrt), chunk=chunk)

    def operands(self) -> PyTree:
        return self.key

    def operand_draws(self, count: int) -> PyTree | None:
        """For ``kind="mc"``: fresh label keys (none equal to ``key``), so a trace's probes
        each see their own labels and its error covers the label sampling.

        Args:
          count: how many draws.

        Returns:
          ``count`` keys stacked, or None for the empirical Fisher.
        """
        if self.kind != "mc":
            return None
        return jax.random.split(jax.random.fold_in(self.key, 0x5EED), count)

    def _prepare(self, params, batches, weights):
        _check_batches(batches, "the Fisher")
        return super()._prepare(params, batches, weights)

    def flat_matvec(self, params, batches, weights, operands=None):
        if self.kind == "empirical":
            x0, outer = _gradient_outer(self.objective, params)
            return x0, lambda v: batch_mean(lambda b: outer(v, b)[0], batches, weights)
        obj = self.objective
        x0, place = obj.split(params)

        def one(v, batch, index):
            out, jvp = jax.linearize(lambda x: obj.model_fn(place(x), batch), x0)
            omega = example_weights(batch, out.shape[0], out.dtype)
            keys = jax.random.split(jax.random.fold_in(operands, index), self.num_samples)
            s = jax.vmap(lambda k: obj.output_loss.sample(k, out))(keys)  # (S, B, ...)
            jv = jvp(v)
            u = jnp.sum((s * jv).reshape(s.shape[:2] + (-1,)), axis=2)  # (S, B)
            cot = jnp.einsum("sb,sb...->b...", u, s) * _expand(omega, s.ndim - 1)
            return jax.linear_transpose(jvp, x0)(cot / self.num_samples)[0]

        return x0, lambda v: _indexed_batch_mean(lambda b, i: one(v, b, i), batches, weights)


class GradientCovariance(Operator):
    """The covariance of the per-example gradients, Σ = Σᵢ ωᵢ gᵢgᵢᵀ − ḡḡᵀ.

    Args:
      loss_fn: a mean loss ``loss_fn(params, batch) -> scalar`` over the batch's examples
        (e.g. `sharp_minima.losses.evaluation_loss`); or a ``model_fn`` with an
        ``output_loss``.
      output_loss: None for a ``loss_fn``; else as for `GGN`.
      wrt, chunk: as for `GGN`.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda w, batch: jnp.mean(batch["x"] @ w)  # g_i = x_i
      >>> batches = {"x": jnp.array([[[1.0, 0.0], [3.0, 0.0]]])}
      >>> cov = GradientCovariance(loss)  # Var of the first coordinate: (1 + 9)/2 - 2² = 1
      >>> cov.matvec(jnp.zeros(2), batches, jnp.array([1.0, 1.0])).tolist()
      [1.0, 0.0]
    """

    name = "covariance"
    products = "gradient-covariance-vector products"

    def __init__(self, loss_fn, output_loss=None, *, wrt=None, chunk: int = 8):
        super().__init__(_objective(loss_fn, output_loss, wrt), chunk=chunk)

    def _prepare(self, params, batches, weights):
        _check_batches(batches, "the gradient covariance")
        return super()._prepare(params, batches, weights)

    def flat_matvec(self, params, batches, weights, operands=None):
        x0, outer = _gradient_outer(self.objective, params)
        # The mean gradient does not depend on v: computed once per kernel call.
        mean = batch_mean(lambda b: outer(jnp.zeros_like(x0), b)[1], batches, weights)

        def matvec(v):
            return batch_mean(lambda b: outer(v, b)[0], batches, weights) - mean * (mean @ v)

        return x0, matvec


# ------------------------------------------------------------------------------- helpers


def _check_batches(batches, what):
    if batches is None:
        raise ValueError(f"{what} is a statistic of examples: batches must not be None")


def _expand(w, ndim):
    return w.reshape(w.shape + (1,) * (ndim - 1))


def _gradient_outer(obj: objective.Objective, params):
    """``(x0, outer)`` with ``outer(v, batch) -> (Σᵢ ωᵢ gᵢ (gᵢ·v), Σᵢ ωᵢ gᵢ)``: the
    per-example gradients gᵢ of ``obj``'s loss by one linearisation of the per-example losses
    and its transpose (no gᵢ is formed)."""
    x0, f = obj.flat_loss(params)

    def outer(v, batch):
        losses, jvp = jax.linearize(lambda x: per_example_losses(f, x, batch), x0)
        omega = example_weights(batch, losses.shape[0], losses.dtype)
        transpose = jax.linear_transpose(jvp, x0)
        return transpose(omega * jvp(v))[0], transpose(omega)[0]

    return x0, outer


def _indexed_batch_mean(fn, batches, weights):
    """`objective.batch_mean` of ``fn(batch, index)`` (the index of the batch, for keys)."""
    if batches is None:
        return fn(None, jnp.asarray(0))
    n = objective.num_batches(batches)
    return batch_mean(lambda bi: fn(*bi), (batches, jnp.arange(n)), weights)
