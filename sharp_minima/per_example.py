"""Exact per-example gradient norms and inner products without forming per-example gradients,
from each layer's inputs and output cotangents (the layer identities `GradientNoise` uses).

For a dense layer y = x W (x of one example: P positions × K inputs, y: P × N outputs) the
example's gradient is gᵢ = xᵢᵀ δᵢ, δᵢ = ∂ℓᵢ/∂yᵢ, so

    |gᵢ|² = Σₜ,ₛ (xₜ·xₛ)(δₜ·δₛ)      (= |xᵢ|²·|δᵢ|² for one position),
    gᵢ·Ḡ  = Σₜ (xₜ Ḡ)·δₜ,

at P²(K + N) or P·K·N operations, whichever is fewer (Goodfellow 2015). One backward pass of
the per-example losses with respect to zero "probes" added to every layer's output gives
every δᵢ (no weight gradient is taken), the forward pass gives every xᵢ, and the mean
gradient Ḡ is one weight-gradient product per layer. For an embedding (a gather of rows)
|gᵢ|² = Σₜ,ₛ [idₜ = idₛ] δₜ·δₛ; a convolution's kernel gradient is formed per example from the
layer's input and δᵢ (for the zoo's shapes cheaper than the Gram form, P² ≫ kernel size);
small parameters (biases, normalisation scales) get their per-example gradients formed
through a zero perturbation of the parameter itself. In every case gᵢ·Ḡ is the layer's
tangent in the direction Ḡ against δᵢ.

The layers are found in the loss's jaxpr, so this works on an unmodified Flax Linen or NNX
model and on a plain-JAX function alike: a parameter leaf consumed by exactly one
`dot_general` without batch dimensions (through reshapes, transposes or casts only) is
"dense"; by one `conv_general_dilated` as its kernel, "conv"; by one row `gather`,
"embedding"; any other leaf of at most `FORM_LIMIT` elements is "formed"; the rest —
weight-tied or recurrent matrices, leaves reaching the loss without meeting the data — are
"chunked": `GradientNoise` takes them through its chunked exact path. `plan` returns each
leaf's route.

Examples must not interact (no BatchNorm in training mode), as for any per-example gradient.

The same reading serves SAM's m-sharpness (`group_layers`, `group_clean`, `group_ascent`,
`group_mean`):
with a group of m examples as the "example" (its examples may interact), a group's
gradient of a dense layer is X_kᵀΔ_k, so its ascent point's layer output
x(W + s_k X_kᵀΔ_k) = xW + s_k (x X_kᵀ) Δ_k shares the product with W across the groups and
adds a low-rank term: no group's copy of the weights is written.
Only jax is imported here.

References:
  Goodfellow (2015), "Efficient per-example gradient computations";
  McCandlish, Kaplan, Amodei et al. (2018), "An empirical model of large-batch training".
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

__all__ = [
    "FORM_LIMIT",
    "ROUTES",
    "Plan",
    "plan",
    "moments",
    "GroupLayers",
    "GroupClean",
    "group_layers",
    "group_clean",
    "group_gradients",
    "group_mean",
    "group_ascent",
]

ROUTES = ("dense", "embedding", "conv", "formed", "chunked")

FORM_LIMIT = 1 << 14
"""Largest leaf (elements) whose per-example gradients are formed outright when no layer
identity applies: the batch's copies of it are written once per example."""

_INLINE = {"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat"}
_PASS_THROUGH = {"convert_element_type", "reshape", "transpose", "copy", "copy_p", "squeeze"}
_BROADCAST = {"broadcast_in_dim"}  # linear too, but not norm-preserving: biases only
_DATA, _CONST = "data", "const"


class _Lit(NamedTuple):
    value: Any


class _Op(NamedTuple):
    prim: Any
    inputs: tuple  # int ids or _Lit
    outputs: tuple  # int ids
    params: dict


class _Program(NamedTuple):
    """A jaxpr with calls inlined: ``ops`` over integer ids."""

    ops: list
    consts: dict  # id -> value
    leaf_ids: list
    data_ids: list
    out_ids: list
    avals: dict  # id -> aval of the op outputs


class Site(NamedTuple):
    """The one op that consumes a leaf with a layer identity.

    Attributes:
      op: the op's index in the inlined program.
      param_pos: the position of the parameter operand.
      chain: the pass-through ops from the leaf to it.
    """

    op: int
    param_pos: int
    chain: tuple


class Plan(NamedTuple):
    """How each leaf's per-example moments are computed (`plan`'s output).

    Attributes:
      routes: each selected leaf's route (`ROUTES`).
      sites: for the layer routes, the leaf's `Site` (None otherwise).
      scalars: ``(op, position)`` of every scalar parameter value (e.g. a weight-decay term)
        that meets the data; its per-example gradient sᵢ·∇r adds to the layers'.
      biases: ``(leaf, site, op)`` for a "formed" leaf added, in the output's own shape, to
        the output of dense op ``op`` and to nothing else: its per-example gradient is that
        layer's δᵢ (no probe of its own).
    """

    routes: tuple
    sites: tuple  # Site or None per leaf
    scalars: tuple = ()
    biases: tuple = ()  # (leaf, its `Site` (the add), the dense op it is added to)


# --------------------------------------------------------------------------------- program


def _program(fn, leaves, example) -> _Program:
    """``fn(leaves, example)`` traced and inlined into one flat list of ops."""
    closed = jax.make_jaxpr(fn)(leaves, example)
    ops, consts, avals = [], {}, {}
    counter = itertools.count()

    def flatten(cj, in_refs):
        jaxpr = cj.jaxpr if isinstance(cj, jcore.ClosedJaxpr) else cj
        cvals = cj.consts if isinstance(cj, jcore.ClosedJaxpr) else ()
        env = {}
        for v, c in zip(jaxpr.constvars, cvals):
            env[v] = i = next(counter)
            consts[i], avals[i] = c, v.aval
        for v, r in zip(jaxpr.invars, in_refs):
            env[v] = r

        def ref(a):
            return _Lit(a.val) if isinstance(a, jcore.Literal) else env[a]

        for eqn in jaxpr.eqns:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if eqn.primitive.name in _INLINE and inner is not None:
                outs = flatten(inner, [ref(a) for a in eqn.invars])
                for o, r in zip(eqn.outvars, outs):
                    env[o] = r
                continue
            outs = []
            for o in eqn.outvars:
                outs.append(next(counter))
                avals[outs[-1]] = o.aval
                env[o] = outs[-1]
            ops.append(
                _Op(eqn.primitive, tuple(ref(a) for a in eqn.invars), tuple(outs), eqn.params)
            )
        return [ref(v) for v in jaxpr.outvars]

    n_leaves = len(jax.tree.leaves(leaves))
    in_ids = [next(counter) for _ in closed.jaxpr.invars]
    avals.update(zip(in_ids, (v.aval for v in closed.jaxpr.invars)))
    out_ids = flatten(closed, in_ids)
    return _Program(ops, consts, in_ids[:n_leaves], in_ids[n_leaves:], out_ids, avals)


def _bind(op, invals):
    params, subfuns = op.prim.get_bind_params(op.params), ()
    if isinstance(params, tuple):  # older jax: (subfuns, params)
        subfuns, params = params
    out = op.prim.bind(*subfuns, *invals, **params)
    return list(out) if op.prim.multiple_results else [out]


# ---------------------------------------------------------------------------------- planning


def _is_row_gather(op, param_pos, leaf_shape) -> bool:
    if op.prim.name != "gather" or param_pos != 0 or len(leaf_shape) != 2:
        return False
    dn = op.params["dimension_numbers"]
    return (
        tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(op.params["slice_sizes"]) == (1, leaf_shape[1])
        and len(dn.offset_dims) == 1
    )


def _analyse(prog: _Program, leaves) -> Plan:
    """Provenance of every value (a leaf through pass-through ops, other parameter values, the
    example's data, constants); an op mixing data with parameter values is a site."""
    kind = {i: ("leaf", j, ()) for j, i in enumerate(prog.leaf_ids)}
    kind.update({i: (_DATA,) for i in prog.data_ids})
    uses = [[] for _ in prog.leaf_ids]  # per leaf: (op index, position, chain or None)

    def of(r):
        return (_CONST,) if isinstance(r, _Lit) or r not in kind else kind[r]

    for n, op in enumerate(prog.ops):
        ks = [of(r) for r in op.inputs]
        has_data = any(k[0] == _DATA for k in ks)
        params = [(p, k) for p, k in enumerate(ks) if k[0] in ("leaf", "param")]
        if has_data and params:
            for p, k in params:
                if k[0] == "leaf":
                    uses[k[1]].append((n, p, k[2], len(params)))
                else:
                    for j in k[1]:
                        uses[j].append((n, p, None, len(params)))
            out = (_DATA,)
        elif has_data:
            out = (_DATA,)
        elif params:
            (p0, k0), *rest = params
            if not rest and k0[0] == "leaf" and op.prim.name in _PASS_THROUGH | _BROADCAST:
                out = ("leaf", k0[1], k0[2] + (n,))
            else:
                js = set()
                for _, k in params:
                    js |= {k[1]} if k[0] == "leaf" else set(k[1])
                out = ("param", frozenset(js))
        else:
            out = (_CONST,)
        for o in op.outputs:
            kind[o] = out
    for r in prog.out_ids:  # a parameter value reaching the loss without meeting the data
        k = of(r)
        if k[0] in ("leaf", "param"):
            for j in [k[1]] if k[0] == "leaf" else k[1]:
                uses[j].append((None, None, None, 0))

    def scalar(n, p):
        r = prog.ops[n].inputs[p]
        return not isinstance(r, _Lit) and r in prog.avals and prog.avals[r].shape == ()

    scalars = sorted(
        {(u[0], u[1]) for us in uses for u in us if u[0] is not None and scalar(*u[:2])}
    )
    routes, sites = [], []
    for j, leaf in enumerate(jax.tree.leaves(leaves)):
        route, site = "chunked", None
        layer = [u for u in uses[j] if u[0] is None or not scalar(*u[:2])]
        if (
            len(layer) == 1
            and layer[0][0] is not None
            and layer[0][2] is not None
            and not any(prog.ops[c].prim.name in _BROADCAST for c in layer[0][2])
        ):  # a layer's parameter: through norm-preserving ops only
            n, p, chain, count = layer[0]
            op = prog.ops[n]
            other = [of(r) for q, r in enumerate(op.inputs) if q != p]
            if count == 1 and op.prim.name == "dot_general":
                (_, _), (lb, rb) = op.params["dimension_numbers"]
                if not lb and not rb and all(k[0] == _DATA for k in other):
                    route, site = "dense", Site(n, p, chain)
            elif count == 1 and op.prim.name == "conv_general_dilated" and p == 1:
                groups = op.params["batch_group_count"] * op.params["feature_group_count"]
                if groups == 1 and other[0][0] == _DATA:
                    route, site = "conv", Site(n, p, chain)
            elif count == 1 and _is_row_gather(op, p, jnp.shape(leaf)) and not chain:
                route, site = "embedding", Site(n, p, chain)
        if route == "chunked" and all(u[0] is not None for u in uses[j]):
            if math.prod(jnp.shape(leaf)) <= FORM_LIMIT:
                route = "formed"
        routes.append(route)
        sites.append(site)
    if not any(s is not None for s in sites):
        scalars = []
    consumers = {}
    for op in prog.ops:
        for r in op.inputs:
            if not isinstance(r, _Lit):
                consumers[r] = consumers.get(r, 0) + 1
    for r in prog.out_ids:
        if not isinstance(r, _Lit):
            consumers[r] = consumers.get(r, 0) + 1
    dense_out = {prog.ops[s.op].outputs[0]: s.op for s, r in zip(sites, routes) if r == "dense"}
    biases = []
    for j, route in enumerate(routes):
        if route != "formed" or len(uses[j]) != 1:
            continue
        n, p, chain, count = uses[j][0]
        if n is None or chain is None or count != 1 or prog.ops[n].prim.name != "add":
            continue
        other, mine = prog.ops[n].inputs[1 - p], prog.ops[n].inputs[p]
        if (
            other in dense_out
            and consumers.get(other) == 1
            and prog.avals[other].shape == _aval_shape(prog, mine)
        ):
            biases.append((j, Site(n, p, chain), dense_out[other]))
    return Plan(tuple(routes), tuple(sites), tuple(scalars), tuple(biases))


def _aval_shape(prog, ref):
    return jnp.shape(ref.value) if isinstance(ref, _Lit) else prog.avals[ref].shape


def _single(fn):
    """``fn(leaves, batch)`` of a mean loss as a function of one example."""
    return lambda leaves, ex: fn(leaves, jax.tree.map(lambda a: a[None], ex))


def example_of(batches):
    """One example of stacked batches (``(nb, B, ...)`` leaves): what `plan` and `moments`
    trace, so that both read one program. A slice, not a `jax.ShapeDtypeStruct`: tracing
    canonicalises a struct's dtype (int64 → int32 with x64 off) but not an array's."""
    return jax.tree.map(lambda a: a[0, 0], batches)


def plan(fn, leaves, example) -> Plan:
    """Each leaf's route for the mean loss ``fn(leaves, batch)``.

    Args:
      fn: ``fn(leaves, batch) -> scalar``, the mean loss over the batch's examples.
      leaves: the parameter leaves (a list of arrays or `jax.ShapeDtypeStruct`).
      example: one example, a batch pytree without its example axis.

    Returns:
      `Plan`; a leaf the analysis cannot place is "chunked" (with a warning when the whole
      jaxpr cannot be read).

    Example:
      >>> import jax.numpy as jnp
      >>> def loss(p, b):  # a dense layer, its bias, and a scalar temperature
      ...     return jnp.mean((jnp.tanh(b["x"] @ p[0] + p[1]) * p[2] - b["y"]) ** 2)
      >>> leaves = [jnp.ones((3, 4)), jnp.zeros(4), jnp.ones(())]
      >>> plan(loss, leaves, {"x": jnp.ones(3), "y": jnp.ones(4)}).routes
      ('dense', 'formed', 'formed')
    """
    try:
        return _analyse(_program(_single(fn), leaves, example), leaves)
    except Exception as err:  # an unforeseen jaxpr: every leaf takes the chunked exact path
        warnings.warn(
            f"per_example: the loss's layers could not be read ({type(err).__name__}: {err}); "
            "every leaf takes the chunked exact path",
            stacklevel=2,
        )
        n = len(jax.tree.leaves(leaves))
        return Plan(("chunked",) * n, (None,) * n)


# ---------------------------------------------------------------------------------- kernels


def _evaluate(prog, leaves, data, probes, param_pos, shifts=None):
    """The program's outputs (the loss first) at every example of ``data`` (a leading axis
    over examples, or groups), with the ``probes`` added: ``probes["y"]`` (op -> zeros with
    the leading axis) to those ops' outputs, ``probes["p"]`` (leaf -> an array per example)
    to those leaves, ``probes["s"]`` ((op, position) -> zeros per example) to those operands,
    and ``shifts[op](inputs)`` (per example) to those ops' outputs. Returns the outputs and
    each "y"-probed op's inputs but its parameter operand (``param_pos[op]``, None in its
    place), all with the leading axis.

    It is ``jax.vmap`` of the program over the leading axis, op by op (`_mapped_dot`: a
    product of examples' data with a shared matrix is one product over all of them)."""
    env = {i: (c, False) for i, c in prog.consts.items()}  # id -> (value, has the axis)
    for j, (i, v) in enumerate(zip(prog.leaf_ids, leaves)):
        env[i] = (v + probes["p"][j], True) if j in probes["p"] else (v, False)
    for i, v in zip(prog.data_ids, jax.tree.leaves(data)):
        env[i] = (v, True)

    def read(r):
        return (r.value, False) if isinstance(r, _Lit) else env[r]

    captured = {}
    for n, op in enumerate(prog.ops):
        vals, mapped = map(list, zip(*[read(r) for r in op.inputs])) if op.inputs else ([], [])
        for q in range(len(vals)):
            if (n, q) in probes["s"]:
                vals[q], mapped[q] = _plus_mapped(vals[q], mapped[q], probes["s"][n, q]), True
        outs = _bind_mapped(op, vals, mapped)
        if shifts and n in shifts:
            outs = [outs[0] + shifts[n](vals).astype(outs[0].dtype)]
        if n in probes["y"]:
            captured[n] = [None if q == param_pos[n] else v for q, v in enumerate(vals)]
            outs = [outs[0] + probes["y"][n]]
        out_mapped = any(mapped) or bool(shifts and n in shifts) or n in probes["y"]
        for o, v in zip(op.outputs, outs):
            env[o] = (v, out_mapped)
    size = jax.tree.leaves(data)[0].shape[0]
    outputs = []
    for r in prog.out_ids:
        v, m = read(r)
        outputs.append(v if m else jnp.broadcast_to(v, (size,) + jnp.shape(v)))
    return outputs, captured


def _plus_mapped(value, mapped, probe):
    """A value (with the leading axis if ``mapped``) plus a scalar per example (``probe``:
    the leading axis alone): the value per example."""
    value = jnp.asarray(value)
    rank = value.ndim - 1 if mapped else value.ndim
    return value + probe.reshape(probe.shape + (1,) * rank)


def _bind_mapped(op, vals, mapped):
    """``op`` on values of which those flagged in ``mapped`` carry a leading axis."""
    if not any(mapped):
        return _bind(op, vals)
    if op.prim.name == "dot_general" and sum(mapped) == 1:
        (_, _), (lb, rb) = op.params["dimension_numbers"]
        if not lb and not rb:
            return [_mapped_dot(op, vals, mapped)]
    axes = [0 if m else None for m in mapped]
    return jax.vmap(lambda *a: _bind(op, list(a)), in_axes=axes)(*vals)


def _mapped_dot(op, vals, mapped):
    """A `dot_general` (no batch dimensions) of one mapped operand with an unmapped one, as
    one matrix product with the leading axis merged into the mapped operand's rows: what
    ``jax.vmap`` computes, but its transpose (the matrix's gradient) is one plain product
    too (vmap's contracts two axes and transposes its result: ≈ 10% of a dense layer's
    gradient on a CPU)."""
    (lc, rc), _ = op.params["dimension_numbers"]
    d = 0 if mapped[0] else 1  # the mapped operand
    x, w = vals[d], vals[1 - d]
    cx, cw = (lc, rc) if d == 0 else (rc, lc)
    fx = [a for a in range(x.ndim - 1) if a not in cx]
    fw = [a for a in range(w.ndim) if a not in cw]
    rows = x.shape[0] * math.prod(x.shape[1 + a] for a in fx)
    xm = jnp.transpose(x, [0] + [1 + a for a in fx] + [1 + a for a in cx]).reshape(rows, -1)
    wm = jnp.transpose(w, list(cw) + fw).reshape(xm.shape[1], -1)
    params = dict(op.params, dimension_numbers=(((1,), (0,)), ((), ())))
    out = _bind(op._replace(params=params), [xm, wm])[0]
    shape = x.shape[:1] + tuple(x.shape[1 + a] for a in fx) + tuple(w.shape[a] for a in fw)
    out = out.reshape(shape)
    if d == 1:  # the op's output lists the unmapped operand's free dimensions first
        nx, nw = len(fx), len(fw)
        out = jnp.transpose(out, [0, *range(1 + nx, 1 + nx + nw), *range(1, 1 + nx)])
    return out


def _scalar_values(prog, leaves, refs):
    """The parameter-only values ``refs`` (op inputs) as a function of the leaves."""
    env = dict(prog.consts)
    env.update(zip(prog.leaf_ids, leaves))
    for op in prog.ops:
        if all(isinstance(r, _Lit) or r in env for r in op.inputs):
            outs = _bind(op, [r.value if isinstance(r, _Lit) else env[r] for r in op.inputs])
            env.update(zip(op.outputs, outs))
    return jnp.stack([env[r] for r in refs])


def _chain(prog, site, leaf):
    """The leaf through the pass-through ops to its site."""
    for n in site.chain:
        leaf = _bind(prog.ops[n], [leaf])[0]
    return leaf


def _unchain(prog, site, leaf, value):
    """A value in the shape the leaf has at its site, brought back to the leaf's own (the
    transpose of the pass-through chain, which is linear)."""
    return jax.linear_transpose(lambda q: _chain(prog, site, q), leaf)(value)[0]


def _local(prog, site, leaf, invals):
    """The site op's output as a function of the leaf, the other inputs held."""
    vals = list(invals)
    vals[site.param_pos] = _chain(prog, site, leaf)
    return _bind(prog.ops[site.op], vals)[0]


def _gram_sq(X, D):
    """|Xᵀ D|² for one example's layer inputs X (P × K) and output cotangents D (P × N): by
    the Gram form Σₜ,ₛ (xₜ·xₛ)(δₜ·δₛ) or by forming Xᵀ D, whichever takes fewer operations."""
    (P, K), N = X.shape, D.shape[1]
    if P == 1:
        return jnp.vdot(X, X) * jnp.vdot(D, D)
    if P * (K + N) <= K * N:
        return jnp.sum((X @ X.T) * (D @ D.T))
    g = X.T @ D
    return jnp.vdot(g, g)


def _dense_sq(op, pos, x, delta):
    """|gᵢ|² of one example's dot_general with the parameter at operand ``pos``."""
    (lc, rc), _ = op.params["dimension_numbers"]
    contract = lc if pos == 1 else rc
    free = [d for d in range(x.ndim) if d not in contract]
    P = math.prod(x.shape[d] for d in free)
    X = jnp.transpose(x, free + list(contract)).reshape(P, -1)
    # The output's dimensions: lhs free then rhs free, so the data's come first when the
    # parameter is the rhs.
    D = delta.reshape(P, -1) if pos == 1 else delta.reshape(-1, P).T
    return _gram_sq(X, D)


def _conv_sq(op, kernel_shape, x, delta):
    """|gᵢ|² of one example's convolution kernel from the layer's patches (its norm does not
    depend on the order of the patch features)."""
    dn = op.params["dimension_numbers"]
    patches = lax.conv_general_dilated_patches(
        x,
        [kernel_shape[d] for d in dn.rhs_spec[2:]],
        op.params["window_strides"],
        op.params["padding"],
        lhs_dilation=op.params["lhs_dilation"],
        rhs_dilation=op.params["rhs_dilation"],
        dimension_numbers=dn,
        precision=op.params.get("precision"),
    )
    order = [dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]]
    X = jnp.transpose(patches, order).reshape(-1, patches.shape[dn.out_spec[1]])
    D = jnp.transpose(delta, order).reshape(X.shape[0], -1)
    return _gram_sq(X, D)


def _embedding_sq(op, leaf_shape, idx, delta):
    v = leaf_shape[0]
    ids = idx.reshape(-1)
    D = delta.reshape(ids.shape[0], -1)
    if op.params["mode"] == lax.GatherScatterMode.CLIP:
        ids, valid = jnp.clip(ids, 0, v - 1), jnp.ones(ids.shape, bool)
    else:
        valid = (ids >= 0) & (ids < v)
    same = (ids[:, None] == ids[None, :]) & valid[:, None] & valid[None, :]
    return jnp.sum(same * (D @ D.T))


def _map(fn, xs):
    """`lax.map` over the leading axis, without the loop for a single batch."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda a: a[None], fn(jax.tree.map(lambda a: a[0], xs)))
    return lax.map(fn, xs)


def _zero_probes(prog, ops, formed, scalars, leaves, size):
    """Zero probes for ``size`` examples: on the outputs of ``ops``, on the ``formed``
    leaves and on the ``scalars`` operands."""

    def zeros(shape, dtype):
        return jnp.zeros((size,) + tuple(shape), dtype)

    outs = {n: prog.avals[prog.ops[n].outputs[0]] for n in ops}
    return {
        "y": {n: zeros(a.shape, a.dtype) for n, a in outs.items()},
        "p": {j: zeros(jnp.shape(leaves[j]), leaves[j].dtype) for j in formed},
        "s": {k: zeros((), prog.avals[prog.ops[k[0]].inputs[k[1]]].dtype) for k in scalars},
    }


def moments(fn, plan_, leaves, batches, pi, *, chunk: int):
    """Per example and leaf on the non-"chunked" routes: |gᵢ|² and gᵢ·Ḡ (``(nb, B, L)`` each,
    zero for "chunked" leaves), and Ḡ of every leaf, for the mean loss ``fn(leaves, batch)``
    over ``batches`` weighted by ``pi`` (``(nb, B)``, summing to one). Call inside a trace.

    The first pass is one backward pass of Σᵢ πᵢ ℓᵢ with respect to the leaves (Ḡ) and the
    per-example probes (each layer's δᵢ, each formed leaf's gᵢ); the second takes each
    layer's tangent along Ḡ against the stored δᵢ (gᵢ·Ḡ).

    Args:
      fn: the mean loss ``fn(leaves, batch)``.
      plan_: its `Plan` (from `plan`).
      leaves: the parameter leaves (a list).
      batches: batch pytree with a leading axis over batches.
      pi: each example's weight.
      chunk: examples whose convolution patches are held at once.

    Returns:
      ``(sq, dot, mean)``.
    """
    prog = _program(_single(fn), leaves, example_of(batches))
    routes, sites, scalars, biases = plan_
    site_ops = {s.op: j for j, s in enumerate(sites) if s is not None}
    bias_of = {j: (site, n) for j, site, n in biases}  # gᵢ: the dense op's δᵢ, chained back
    formed = [j for j, r in enumerate(routes) if r == "formed" and j not in bias_of]
    param_pos = {n: sites[j].param_pos for n, j in site_ops.items()}
    if scalars:  # ∇r for every scalar parameter value r meeting the data: (K, *leaf) per leaf
        refs = [prog.ops[n].inputs[q] for n, q in scalars]
        v = jax.jacrev(lambda L: _scalar_values(prog, L, refs))(list(leaves))
        vv = [jnp.einsum("k...,l...->kl", a, a) for a in v]

    def tangent(n, j, xs, direction):
        """The site's output change along ``direction`` of its leaf, per example: the op
        itself at ``direction`` for the linear ones (a product, a convolution), a tangent for
        a gather (whose out-of-range rows are a fill value, not linear)."""
        s = sites[j]
        if routes[j] != "embedding":
            return jax.vmap(lambda xi: _local(prog, s, direction, xi))(xs)
        return jax.vmap(
            lambda xi: jax.jvp(lambda q: _local(prog, s, q, xi), (leaves[j],), (direction,))[1]
        )(xs)

    def against(t, d):
        return jnp.sum((t * d).reshape(t.shape[0], -1), axis=1)

    def first(args):
        batch, w = args
        size = w.shape[0]
        zeros = _zero_probes(prog, site_ops, formed, scalars, leaves, size)

        def total(L, z):  # Σᵢ πᵢ ℓᵢ: its gradient is Ḡ, and the probes' are πᵢ·δᵢ
            outs, cap = _evaluate(prog, L, batch, z, param_pos)
            return jnp.sum(w.astype(outs[0].dtype) * outs[0]), cap

        (means, grads), cap = jax.grad(total, argnums=(0, 1), has_aux=True)(list(leaves), zeros)
        # The probes' gradients are πᵢ-weighted: each example's results are divided by πᵢ
        # (squares by πᵢ²) rather than the arrays (padding: zero anyway).
        inv = 1 / jnp.where(w > 0, w, 1)
        inv2 = inv * inv
        dy, dp = grads["y"], grads["p"]
        sc = jnp.stack([grads["s"][k] for k in scalars], -1) * inv[:, None] if scalars else None
        sq = [jnp.zeros(w.shape, w.dtype) for _ in leaves]
        for n, j in site_ops.items():
            s, op, xs = sites[j], prog.ops[n], cap[n]
            if routes[j] == "dense":
                x = xs[1 - s.param_pos]
                sq[j] = jax.vmap(lambda a, d, op=op, s=s: _dense_sq(op, s.param_pos, a, d))(
                    x, dy[n]
                )
            elif routes[j] == "embedding":
                sq[j] = jax.vmap(
                    lambda i, d, op=op, j=j: _embedding_sq(op, jnp.shape(leaves[j]), i, d)
                )(xs[1], dy[n])
            else:  # conv: from the layer's patches, chunk at a time
                kshape = jnp.shape(_chain(prog, s, leaves[j]))
                sq[j] = lax.map(
                    lambda a, op=op, kshape=kshape: _conv_sq(op, kshape, *a),
                    (xs[0], dy[n]),
                    batch_size=chunk,
                )
            sq[j] = sq[j] * inv2.astype(sq[j].dtype)
            if scalars:  # gᵢ = gᵢ(layer) + Σₖ sᵢₖ ∇rₖ
                cross = jnp.stack(
                    [against(tangent(n, j, xs, v[j][k]), dy[n]) for k in range(len(scalars))], -1
                ) * inv[:, None].astype(sc.dtype)
                sq[j] = (
                    sq[j] + 2 * jnp.sum(sc * cross, -1) + jnp.einsum("bk,kl,bl->b", sc, vv[j], sc)
                )
        for j, (site, n) in bias_of.items():  # the chain is linear: its transpose
            dp[j] = jax.vmap(lambda d, site=site, j=j: _unchain(prog, site, leaves[j], d))(dy[n])
        for j in formed + list(bias_of):
            g = dp[j].reshape(w.shape[0], -1)
            sq[j] = jnp.sum(g * g, axis=1) * inv2.astype(g.dtype)
        stored = {j: dp[j] for j in formed + list(bias_of)}
        return jnp.stack(sq, -1), means, (w, dy, stored, sc, cap)

    sq, means, stored = _map(first, (batches, pi))
    mean = [g.sum(0) for g in means]

    def second(args):
        w, dy, dp, sc, cap = args
        inv = (1 / jnp.where(w > 0, w, 1)).astype(mean[0].dtype)
        dot = [jnp.zeros(w.shape, mean[0].dtype) for _ in leaves]
        for n, j in site_ops.items():
            dot[j] = against(tangent(n, j, cap[n], mean[j]), dy[n]) * inv
            if scalars:
                dot[j] = dot[j] + sc @ jnp.tensordot(v[j], mean[j], axes=mean[j].ndim)
        for j in dp:
            dot[j] = jnp.tensordot(dp[j], mean[j], axes=mean[j].ndim) * inv
        return jnp.stack(dot, -1)

    dot = _map(second, stored) if (site_ops or formed or bias_of) else jnp.zeros_like(sq)
    return sq, dot, mean


# ------------------------------------------------------------------ SAM's m-sharpness groups


class GroupLayers(NamedTuple):
    """A group objective's program and plan for `group_clean` / `group_ascent` (from
    `group_layers`).

    Attributes:
      prog: the objective's program (its jaxpr, calls inlined).
      plan: each leaf's route ("dense" or "formed").
      out_tree: the structure of the objective's outputs (``objective`` or
        ``(objective, aux)``).
    """

    prog: _Program
    plan: Plan
    out_tree: Any


class GroupClean(NamedTuple):
    """The clean pass over G groups (`group_clean`).

    Attributes:
      outputs: the objective's outputs per group (the objective first), stacked on axis 0.
      sq: ``(G,)`` each group's squared gradient norm ‖g_k‖² (float32 at least).
      state: what `group_ascent`, `group_mean` and `group_gradients` read (layer inputs,
        output cotangents, the formed leaves' group gradients).
    """

    outputs: list
    sq: Any
    state: tuple


def group_layers(fn, leaves, group) -> GroupLayers | None:
    """The layer plan of a group objective for SAM's m-sharpness by layers, or None when it
    does not apply: some leaf is neither "dense" nor "formed" (a convolution, an embedding,
    a weight-tied matrix), a scalar parameter term meets the data (weight decay inside the
    loss), no leaf is dense, or the jaxpr cannot be read.

    Args:
      fn: ``fn(leaves, group) -> objective`` or ``(objective, aux)`` of one group of
        examples (its examples may interact, e.g. BatchNorm in training mode).
      leaves: the parameter leaves (a list).
      group: one group's data (arrays or `jax.ShapeDtypeStruct`).

    Returns:
      `GroupLayers` or None.
    """
    try:
        prog = _program(fn, leaves, group)
        plan_ = _analyse(prog, leaves)
        out_tree = jax.tree.structure(jax.eval_shape(fn, leaves, group))
    except Exception:  # noqa: BLE001  (the caller takes the general path)
        return None
    if plan_.scalars or not set(plan_.routes) <= {"dense", "formed"}:
        return None
    if "dense" not in plan_.routes:
        return None
    return GroupLayers(prog, plan_, out_tree)


def _dense_shift(op, pos, x, X, D):
    """The change of one dense op's output at input ``x`` when its parameter operand moves
    by the gradient of another input ``X`` against output cotangents ``D`` (Xᵀ D in the
    operand's layout): (x Xᵀ) D through the Gram (P²(K + N) operations) or x (Xᵀ D), the
    cheaper. In the op's output layout."""
    (lc, rc), _ = op.params["dimension_numbers"]
    contract = lc if pos == 1 else rc
    free = [d for d in range(x.ndim) if d not in contract]
    P = math.prod(x.shape[d] for d in free)
    a = jnp.transpose(x, free + list(contract)).reshape(P, -1)
    b = jnp.transpose(X, free + list(contract)).reshape(P, -1)
    d = D.reshape(P, -1) if pos == 1 else D.reshape(-1, P).T
    K, N = a.shape[1], d.shape[1]
    out = (a @ b.T) @ d if P * (K + N) <= 2 * K * N else a @ (b.T @ d)
    return (out if pos == 1 else out.T).reshape(D.shape)


def _group_parts(layers):
    prog, (routes, sites, _, _), _ = layers
    dense = {sites[j].op: j for j, r in enumerate(routes) if r == "dense"}
    formed = [j for j, r in enumerate(routes) if r == "formed"]
    param_pos = {n: sites[j].param_pos for n, j in dense.items()}
    return prog, sites, dense, formed, param_pos


def group_clean(layers: GroupLayers, leaves, groups) -> GroupClean:
    """The clean pass of G groups: each group's outputs and squared gradient norm, from its
    layers' inputs and output cotangents (one backward pass that stops at the layers'
    outputs: no weight gradient is formed, neither a group's nor their mean, `group_mean`).
    Call inside a trace.

    Args:
      layers: from `group_layers`.
      leaves: the parameter leaves.
      groups: the groups' data, stacked on a leading axis of G.

    Returns:
      `GroupClean`.
    """
    prog, sites, dense, formed, param_pos = _group_parts(layers)
    G = jax.tree.leaves(groups)[0].shape[0]
    zeros = _zero_probes(prog, dense, formed, (), leaves, G)

    def total(z):  # the groups' mean objective; the probes' gradients are δ_k / G
        outs, cap = _evaluate(prog, list(leaves), groups, z, param_pos)
        return jnp.mean(outs[0]), (outs, cap)

    grads, (outs, cap) = jax.grad(total, has_aux=True)(zeros)
    deltas = {n: G * grads["y"][n] for n in dense}
    xs = {n: cap[n][1 - param_pos[n]] for n in dense}
    formed_g = {j: G * grads["p"][j] for j in formed}

    def wide(a):
        return a.astype(jnp.promote_types(a.dtype, jnp.float32))

    sq = jnp.zeros((G,), jnp.float32)
    for n in dense:
        op, pos = prog.ops[n], param_pos[n]
        sq = sq + jax.vmap(lambda a, d, op=op, pos=pos: _dense_sq(op, pos, wide(a), wide(d)))(
            xs[n], deltas[n]
        )
    for g in formed_g.values():
        sq = sq + jnp.sum(wide(g).reshape(G, -1) ** 2, axis=1)
    return GroupClean(outs, sq, (xs, deltas, formed_g, cap))


def group_mean(layers: GroupLayers, leaves, clean: GroupClean) -> list:
    """Each leaf's gradient of the groups' mean objective (the clean mini-batch gradient, the
    mean of the groups' gradients), from the clean pass: a dense layer's is one product over
    the whole batch (the weight products a backward pass would have done), a formed leaf's
    the mean of its group gradients. SAM's step does not need it (each group ascends along
    its own gradient); its ‖g‖ and cos(g, g_SAM) diagnostics do. Call inside a trace.

    Args:
      layers: from `group_layers`.
      leaves: the parameter leaves.
      clean: from `group_clean`.

    Returns:
      A list like ``leaves``.
    """
    prog, sites, dense, formed, param_pos = _group_parts(layers)
    _, deltas, formed_g, cap = clean.state
    G = next(iter(deltas.values())).shape[0]
    out = [None] * len(leaves)
    for n, j in dense.items():
        s = sites[j]

        def layer(q, s=s, n=n):  # the op over all groups at once, the leaf shared
            vals = list(cap[n])
            vals[s.param_pos] = _chain(prog, s, q)
            mapped = [k != s.param_pos for k in range(len(vals))]
            return _bind_mapped(prog.ops[n], vals, mapped)[0]

        out[j] = jax.vjp(layer, leaves[j])[1](deltas[n] / G)[0]
    for j in formed:
        out[j] = jnp.mean(formed_g[j], axis=0)
    return out


def group_gradients(layers: GroupLayers, leaves, clean: GroupClean) -> list:
    """Each group's gradient of every leaf, formed from the clean pass (``(G, *leaf)`` per
    leaf): for a transformation that needs them whole (ASAM's ascent). Call inside a trace.

    Args:
      layers: from `group_layers`.
      leaves: the parameter leaves.
      clean: from `group_clean`.

    Returns:
      A list of ``(G, *leaf)`` arrays.
    """
    prog, sites, dense, formed, param_pos = _group_parts(layers)
    xs, deltas, formed_g, cap = clean.state
    out = [None] * len(leaves)
    for n, j in dense.items():
        s = sites[j]

        def one(invals, d, s=s, j=j):
            return jax.vjp(lambda q: _local(prog, s, q, invals), leaves[j])[1](d)[0]

        out[j] = jax.vmap(one)(cap[n], deltas[n])
    for j in formed:
        out[j] = formed_g[j]
    return out


def group_ascent(layers: GroupLayers, leaves, groups, clean: GroupClean, scale):
    """SAM's m-sharpness step by layers: each group's objective at its own ascent point
    w + ε_k, ε_k = ``scale[k]`` · g_k, and the gradient of their mean with respect to w (ε_k
    held fixed: the mean of the groups' gradients at their own points). A dense layer's
    move x ε_k is low rank, (x X_kᵀ) Δ_k, so every group shares the unperturbed kernel's
    product (one product over the whole batch) and no group's copy of the parameters is
    written; small ("formed") leaves move explicitly. Call inside a trace.

    Args:
      layers: from `group_layers`.
      leaves: the parameter leaves (w).
      groups: the groups' data, stacked on a leading axis of G.
      clean: the clean pass (`group_clean`) at ``leaves``.
      scale: ``(G,)`` each group's step along its gradient (ρ / ‖g_k‖ for SAM).

    Returns:
      ``(outputs, mean)``: each group's outputs at its point (the objective first), and each
      leaf's gradient of their mean.
    """
    prog, sites, dense, formed, param_pos = _group_parts(layers)
    xs, deltas, formed_g, _ = clean.state

    def shift(n):
        op, pos = prog.ops[n], param_pos[n]

        def one(x, X, D, a):
            return a.astype(X.dtype) * _dense_shift(op, pos, x, X, D)

        return lambda vals: jax.vmap(one)(vals[1 - pos], xs[n], deltas[n], scale)

    def scaled(f):
        return scale.reshape((-1,) + (1,) * (f.ndim - 1)).astype(f.dtype) * f

    probes = {"y": {}, "p": {j: scaled(f) for j, f in formed_g.items()}, "s": {}}
    shifts = {n: shift(n) for n in dense}

    def total(L):
        outs = _evaluate(prog, L, groups, probes, param_pos, shifts)[0]
        return jnp.mean(outs[0]), outs

    mean, outs = jax.grad(total, has_aux=True)(list(leaves))
    return outs, mean
