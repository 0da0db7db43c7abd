"""Tests of sharp_minima.dynamics: the simulators' stationary spread against the discrete-time
closed forms, double-well occupation against the Boltzmann and Laplace predictions, and the
population step against separate steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from sharp_minima import dynamics, gradients, optim

R = 20_000  # runs: the sample variance's relative standard error is √(2/R) = 1%


# Steps to stationarity from x0 = 0: the variance's gap to its stationary value shrinks by
# (1 − ηh)² per step, at most 0.81 in the tests below (0.81^100 < 1e-9 of it is left; the
# mini-batch runs: 0.64^50 < 1e-9).
STEPS = 100


def stationary(sim, dim, lr, steps=STEPS, x0=None, seed=0):
    x0 = jnp.zeros((R, dim)) if x0 is None else x0
    return sim.run(x0, key=jax.random.key(seed), learning_rate=lr, num_steps=steps).final


def within(sample_var, expected, n=R):
    """The sample variance of n Gaussian draws is within 5 standard errors of ``expected``."""
    return abs(sample_var - expected) < 5 * expected * np.sqrt(2 / n)


def test_gaussian_noise_stationary_spread_matches_the_discrete_closed_form():
    h, lr, sigma = np.array([1.0, 3.0]), 0.2, 0.7
    pot = dynamics.quadratic(h)
    # x ← (1 − ηh)x − ηξ: Var = η²σ² / (1 − (1 − ηh)²) = ησ² / (h(2 − ηh)).
    final = stationary(dynamics.Simulator(pot, dynamics.isotropic_noise(sigma)), 2, lr)
    expected = lr * sigma**2 / (h * (2 - lr * h))
    assert all(within(v, e) for v, e in zip(final.var(0), expected))
    sigmas = np.array([0.5, 2.0])
    final = stationary(dynamics.Simulator(pot, dynamics.diagonal_noise(sigmas)), 2, lr, seed=1)
    expected = lr * sigmas**2 / (h * (2 - lr * h))
    assert all(within(v, e) for v, e in zip(final.var(0), expected))
    # A full covariance: the discrete Lyapunov equation P = A P Aᵀ + η² C, A = I − ηH.
    cov = np.array([[1.0, 0.6], [0.6, 0.5]])
    final = stationary(dynamics.Simulator(pot, dynamics.covariance_noise(cov)), 2, lr, seed=2)
    a = np.eye(2) - lr * np.diag(h)
    p = scipy.linalg.solve_discrete_lyapunov(a, lr**2 * cov)
    got = np.cov(final.T)
    assert abs(got[0, 1] - p[0, 1]) < 5 * np.sqrt((p[0, 0] * p[1, 1] + p[0, 1] ** 2) / R)
    assert all(within(got[i, i], p[i, i]) for i in range(2))
    # Curvature-shaped noise C = s·H on a quadratic: diagonal with σ² = s·h.
    final = stationary(dynamics.Simulator(pot, dynamics.curvature_noise(0.3, pot)), 2, lr, seed=3)
    expected = lr * 0.3 * h / (h * (2 - lr * h))
    assert all(within(v, e) for v, e in zip(final.var(0), expected))


def test_euler_maruyama_and_minibatch_sgd_stationary_spread():
    h, dt, temp = 2.0, 0.05, 0.3
    pot = dynamics.quadratic([h])
    # x ← (1 − h dt)x + √(2T dt) ξ: Var = T / (h (1 − h dt / 2)).
    final = stationary(dynamics.Simulator(pot, dynamics.langevin_noise(temp, dt)), 1, dt)
    assert within(final.var(), temp / (h * (1 - h * dt / 2)))
    # SGD on N examples with ℓᵢ = ½h(x − cᵢ)²: the mean of B gradients drawn without
    # replacement has variance h²s²/B·(N − B)/(N − 1) around h(x − c̄).
    rng = np.random.default_rng(0)
    c = jnp.asarray(rng.normal(size=(50,)))
    noise = dynamics.minibatch_noise(lambda x, ci: h * (x - ci), c, batch_size=10)
    lr, runs = 0.1, 4000  # sampling without replacement costs more per step: fewer runs
    sim = dynamics.Simulator(pot, noise)
    final = sim.run(
        jnp.zeros((runs, 1)), key=jax.random.key(4), learning_rate=lr, num_steps=50
    ).final
    s2 = float(np.var(np.asarray(c)))
    noise_var = h**2 * s2 / 10 * (50 - 10) / (50 - 1)
    expected = lr**2 * noise_var / (1 - (1 - lr * h) ** 2)
    assert within(final.var(), expected, n=runs)
    assert abs(final.mean() - float(c.mean())) < 5 * np.sqrt(expected / runs)
    # With replacement-free sampling ignored (no (N − B)/(N − 1)) the prediction is 22% off:
    assert not within(final.var(), expected * 49 / 40, n=runs)


def test_double_well_occupation_follows_boltzmann_and_approaches_laplace_as_t_falls():
    pot = dynamics.double_well(depth_a=1.0, depth_b=0.8, curv_a=8.0, curv_b=2.0)
    # The Laplace ratio √(H_B/H_A)·exp(−(L_A − L_B)/T) becomes exact as T → 0.
    errors = [
        abs(dynamics.boltzmann_ratio(pot, t) / dynamics.laplace_ratio(pot, t) - 1)
        for t in (0.2, 0.1, 0.05, 0.025)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 4
    # Langevin runs, half started in each well, occupy the wells as exp(−L/T) says.
    temp, dt = 0.35, 0.01
    sim = dynamics.Simulator(pot, dynamics.langevin_noise(temp, dt))
    x0 = jnp.concatenate([jnp.full((1000, 1), -1.0), jnp.full((1000, 1), 1.79)])
    final = sim.run(x0, key=jax.random.key(0), learning_rate=dt, num_steps=10_000).final
    p_left = float((final[:, 0] < 0).mean())
    expected = dynamics.boltzmann_ratio(pot, temp)
    expected_left = expected / (1 + expected)
    se = np.sqrt(expected_left * (1 - expected_left) / len(final))
    assert abs(p_left - expected_left) < 5 * se + 0.02  # sampling + Euler-Maruyama bias
    # The depths alone (no curvature prefactor) predict 64% in A: far from what the runs do.
    depths_only = np.exp(0.2 / temp) / (1 + np.exp(0.2 / temp))
    assert abs(p_left - depths_only) > 5 * se + 0.02


def test_escape_steps_are_recorded():
    pot = dynamics.double_well()
    sim = dynamics.Simulator(pot, dynamics.langevin_noise(0.3, 0.01), escaped=lambda x: x[0] > 0)
    out = sim.run(
        jnp.full((500, 1), -1.0), key=jax.random.key(0), learning_rate=0.01, num_steps=3000
    )
    escaped = out.escape_step >= 0
    assert 0 < escaped.mean() < 1  # some escape over the barrier, some not yet
    assert out.escape_step[escaped].max() <= 3000 and np.all(out.escape_step[~escaped] == -1)
    with pytest.raises(ValueError, match=r"x0 must have shape \(runs, 1\)"):
        sim.run(jnp.zeros(5), key=jax.random.key(0), learning_rate=0.1, num_steps=2)


OPTIMIZERS = {  # learning rate -> the members' optimizer
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "sam": lambda learning_rate: optax.chain(optim.sam(0.05), optax.sgd(learning_rate)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_population_step_equals_separate_steps(name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)

        def loss(p, b):
            h = jnp.tanh(b["x"] @ p["w1"])
            return jnp.mean((h @ p["w2"] - b["y"]) ** 2)

        members = 3
        params = {
            "w1": jnp.asarray(rng.normal(size=(members, 4, 8))),
            "w2": jnp.asarray(rng.normal(size=(members, 8))),
        }
        data = {"x": jnp.asarray(rng.normal(size=(32, 4))), "y": jnp.asarray(rng.normal(size=32))}
        lrs = jnp.array([0.01, 0.05, 0.1])
        trainer = dynamics.PopulationTrainer(loss, OPTIMIZERS[name])
        state = trainer.init(params, learning_rates=lrs)
        order = jnp.asarray(rng.integers(0, 32, size=(members, 5, 8)))
        pop, _, losses = trainer.epoch(params, state, data, order)
        for m in range(members):
            tx = OPTIMIZERS[name](float(lrs[m]))
            p = jax.tree.map(lambda a, m=m: a[m], params)
            s = tx.init(p)
            for step in range(5):
                batch = jax.tree.map(lambda a, i=order[m, step]: a[i], data)
                value, g = jax.value_and_grad(loss)(p, batch)
                np.testing.assert_allclose(losses[m, step], value, rtol=1e-12)
                updates, s = optax.with_extra_args_support(tx).update(
                    g, s, p, value=value, value_fn=lambda q, b=batch: loss(q, b)
                )
                p = optax.apply_updates(p, updates)
            for a, b in zip(
                jax.tree.leaves(p), jax.tree.leaves(jax.tree.map(lambda a, m=m: a[m], pop))
            ):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert trainer.num_traces == 1


def test_noisy_quadratic_closed_form_matches_simulation_and_fits_the_critical_batch():
    q = dynamics.noisy_quadratic(8)
    lr, b, steps = 0.8, 2, 60
    sim = dynamics.Simulator(
        dynamics.quadratic(q.curvatures), dynamics.diagonal_noise(np.sqrt(q.noise / b))
    )
    x0 = jax.random.normal(jax.random.key(1), (R, 8))  # E[x²] = 1 = m(0)
    out = sim.run(x0, key=jax.random.key(2), learning_rate=lr, num_steps=steps, record_every=20)
    simulated = 0.5 * ((out.mean**2 + out.var) * q.curvatures).sum(1)
    closed = q.loss(lr, b, [20, 40, 60])
    np.testing.assert_allclose(simulated, closed, rtol=5 * np.sqrt(2 / R))
    # The recurrence by hand for one coordinate: m ← (1 − ηh)² m + η² c / B.
    m = 1.0
    for _ in range(3):
        m = (1 - lr * q.curvatures[0]) ** 2 * m + lr**2 * q.noise[0] / b
    one = dynamics.NoisyQuadratic(q.curvatures[:1], q.noise[:1], q.init_sq[:1])
    assert float(one.loss(lr, b, 3)) == pytest.approx(0.5 * q.curvatures[0] * m, rel=1e-12)
    # Steps to a target: the first integer step at or below it; never below the floor.
    target = float(q.loss(lr, b, 25))
    t = q.steps_to_target(target, lr, b)
    assert q.loss(lr, b, t) <= target < q.loss(lr, b, t - 1)
    assert q.steps_to_target(0.5 * float(q.loss(lr, b, np.inf)), lr, b) == np.inf
    assert q.steps_to_target(1.0, 2.5, b) == np.inf  # η ≥ 2/h_max diverges
    # Tuned per B, the steps fall as 1/B at small B and level off: the fit finds B_crit
    # between the regimes and follows the curve to a few percent.
    grid = np.geomspace(1e-2, 1.99, 40)
    target = 0.05 * float(q.loss(1.0, 1.0, 0))
    bs = [2.0**i for i in range(12)]
    s = [q.best_steps(target, bb, grid)[0] for bb in bs]
    fit = gradients.critical_batch(bs, s)
    assert bs[0] < fit.b_crit < bs[-1] and fit.residual < 0.1
    assert s[0] / s[1] > 1.8 and s[-2] / s[-1] < 1.1


def test_critical_batch_fit_recovers_its_parameters_and_rejects_bad_input():
    bs = np.array([4, 16, 64, 256, 1024], np.float64)
    s = 500 * (1 + 100 / bs) * np.array([1.02, 0.98, 1.01, 0.99, 1.0])
    fit = gradients.critical_batch(bs, s)
    assert fit.b_crit == pytest.approx(100, rel=0.05) and fit.b_crit_stderr > 0
    assert fit.e_min == pytest.approx(fit.b_crit * fit.s_min)
    np.testing.assert_allclose(fit.steps(bs), s, rtol=0.05)
    with pytest.raises(ValueError, match=">= 3 finite"):
        gradients.critical_batch([1, 2, 4], [10, np.inf, 3])
    with pytest.raises(ValueError, match="do not fall"):
        gradients.critical_batch([1, 2, 4], [1, 2, 4])  # steps grow with B


def test_population_evaluate_and_learning_rate_schedule():
    loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)  # noqa: E731
    metrics = lambda w, d: {"mse": loss(w, d), "norm": jnp.sum(w**2)}  # noqa: E731
    trainer = dynamics.PopulationTrainer(loss, optax.sgd, metrics_fn=metrics)
    params = jnp.stack([jnp.zeros(2), jnp.ones(2)])
    state = trainer.init(params, learning_rates=jnp.array([0.1, 0.2]))
    data = {"x": jnp.eye(2), "y": jnp.array([1.0, 2.0])}
    m = trainer.evaluate(params, data)
    np.testing.assert_allclose(m["mse"], [2.5, 0.5])
    np.testing.assert_allclose(m["norm"], [0.0, 2.0])
    state = trainer.set_learning_rates(state, [0.0, 0.5])
    np.testing.assert_allclose(trainer.learning_rates(state), [0.0, 0.5])
    order = np.zeros((2, 1, 2), np.int32) + np.arange(2)  # both examples, one step
    new, _, _ = trainer.epoch(params, state, data, order)
    np.testing.assert_allclose(new[0], params[0])  # rate 0: unchanged
    # member 1: w − 0.5·(2/2)·(w − y) = (1 + 0.5·(1 − 1), 1 + 0.5·(2 − 1))
    np.testing.assert_allclose(new[1], [1.0, 1.5], rtol=1e-6)
    with pytest.raises(ValueError, match="metrics_fn"):
        dynamics.PopulationTrainer(loss, optax.sgd).evaluate(params, data)


def test_noise_params_change_the_noise_without_recompiling():
    h, lr = 1.0, 0.2
    sim = dynamics.Simulator(dynamics.quadratic([h]), dynamics.isotropic_noise(1.0))
    for sigma in (0.5, 2.0):
        out = sim.run(
            jnp.zeros((R, 1)),
            key=jax.random.key(5),
            learning_rate=lr,
            num_steps=200,
            noise_params=sigma,
        )
        assert within(out.final.var(), lr * sigma**2 / (h * (2 - lr * h)))
    # another number of steps runs the same compiled loop (nothing recorded)
    sim.run(
        jnp.zeros((R, 1)), key=jax.random.key(5), learning_rate=lr, num_steps=7, noise_params=1.0
    )
    assert sim.num_traces == 1
    with pytest.raises(ValueError, match="shaped like"):
        sim.run(
            jnp.zeros((4, 1)),
            key=jax.random.key(0),
            learning_rate=lr,
            num_steps=2,
            noise_params=jnp.ones(3),
        )


def test_a_population_shards_its_members_over_the_devices_and_pads_a_count_they_do_not_divide():
    """6 members on the suite's 4 devices (padded to 8: 2 per device) give the numbers of one
    device, and each device holds 2 members' parameters and optimizer states."""
    assert jax.device_count() == 4
    rng = np.random.default_rng(1)

    def loss(p, b):
        return jnp.mean((jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2)

    metrics = lambda p, d: {"loss": loss(p, d)}  # noqa: E731
    members = 6
    params = {
        "w1": jnp.asarray(rng.normal(size=(members, 4, 8)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(members, 8)), jnp.float32),
    }
    data = {"x": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32), "y": jnp.zeros(32)}
    order = rng.integers(0, 32, size=(members, 3, 8))
    lrs = jnp.linspace(0.01, 0.06, members)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("all", None)):
        trainer = dynamics.PopulationTrainer(
            loss, lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
            metrics_fn=metrics, devices=devices,
        )  # fmt: skip
        state = trainer.init(params, learning_rates=lrs)
        p, state, losses = trainer.epoch(params, state, data, order)
        p, state, last = trainer.step(p, state, jax.tree.map(lambda a: a[order[:, 0]], data))
        out[name] = (p, state, losses, last, trainer.evaluate(p, data))
        if devices is None:
            placed = trainer._place((p, state), members)
            shards = [s.data.shape[0] for s in jax.tree.leaves(placed)[0].addressable_shards]
            assert shards == [2, 2, 2, 2]  # 8 padded members, 2 per device
            assert losses.shape == (members, 3) and p["w1"].shape == (members, 4, 8)
    for a, b in zip(jax.tree.leaves(out["one"]), jax.tree.leaves(out["all"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_members_on_a_device_outside_the_mesh_are_padded_onto_it():
    """3 members committed to device 3, a trainer on devices 0 and 1 (padded to 4): the
    numbers of a trainer on one device, the results on the trainer's mesh."""
    loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)  # noqa: E731
    params = jax.device_put(jnp.zeros((3, 2)), jax.devices()[3])
    batch = {"x": np.ones((3, 4, 2), np.float32), "y": np.ones((3, 4), np.float32)}
    lrs = np.array([0.0, 0.1, 0.2], np.float32)
    got = {}
    for name, devices in (("mesh", jax.devices()[:2]), ("one", jax.devices()[:1])):
        trainer = dynamics.PopulationTrainer(loss, optax.sgd, devices=devices)
        p, _, losses = trainer.step(params, trainer.init(params, learning_rates=lrs), batch)
        got[name] = (np.asarray(p), np.asarray(losses))
        assert p.devices() <= set(devices)
    np.testing.assert_allclose(got["mesh"][0][:, 0], [0.0, 0.2, 0.4], rtol=1e-6)  # 2η
    for a, b in zip(got["mesh"], got["one"]):
        np.testing.assert_array_equal(a, b)
