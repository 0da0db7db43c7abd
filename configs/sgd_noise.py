"""The lecture notes "Towards Understanding SGD": the SGD noise scale, batch size and
sharpness (`sharp_minima.studies.sgd_noise`).

    python -m experiments.sgd_noise --workdir=runs/sgd_noise   # this CPU-sized config

Default (CPU-sized, ~15 minutes on 2 cores): a ReLU MLP 40-64-64-10 on the embedded MNIST-1D
(4,000 training / 1,000 test examples), plain SGD, every training sweep a population of
small models trained in one vmapped program (`sharp_minima.dynamics.PopulationTrainer`),
3 seeds. Variants:

- ``fashion``: a 784-128-128-10 MLP on a 10,000-example Fashion-MNIST subset (needs the
  Debian package or TFDS);
- ``paper``: closer to the sources' scale — the full Fashion-MNIST training set, the
  batch grids up to 8,192 and 3 seeds (GPU/TPU);
- ``tiny``: seconds per section, for tests.

The sources' setups (ImageNet ResNet-50 for Goyal et al., MNIST for Smith & Le, CIFAR-10
for Jastrzębski et al. 2017) are GPU-scale; their numbers stand beside ours in the report.
"""

import ml_collections

from configs import base


def get_config(arg=None):
    c = base.model_and_data()  # the populations train their own way: no trainer fields
    c.name = "sgd_noise"
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict({"widths": (64, 64)})
    c.data.name = "mnist1d"
    # By name, in any order (they run in the study's order); on the command line a comma
    # list: --config.sections=toy,sde.
    c.sections = ("rescaling", "toy", "scaling", "noise_scale", "factors", "sde", "critical")

    s = c.sgd_noise = ml_collections.ConfigDict()
    s.seeds = 3  # every claim over seeds needs ≥ 3
    s.curvature_examples = 1000  # training examples for λ_max, traces, φ, log det
    s.curvature_batch_size = 500

    # 0. flatness depends on the parameterisation (Dinh et al. 2017)
    r = s.rescaling = ml_collections.ConfigDict()
    r.alphas = (0.1, 0.3, 1.0, 3.0, 10.0)
    r.batch_size = 32
    r.learning_rate = 0.1
    r.num_epochs = 30
    r.epsilon = 1e-3  # Keskar's φ
    r.adaptive_epsilon = 1e-2  # adaptive sharpness box ε|w|
    r.slice_radius = 0.5  # filter-normalised slice, t ∈ [−r, r]
    r.slice_points = 21
    r.trace_matvecs = 60
    r.claims = ml_collections.ConfigDict()  # fixed before the run
    r.claims.orders = 1.0  # λ_max, tr H move ≥ 10× over α ∈ [0.1, 10] (Dinh: "arbitrarily")
    r.claims.phi_spread = 1.5  # Keskar's φ moves beyond 1.5×
    r.claims.invariant_spread = 0.01  # scale-invariant measures within 1 %

    # 1. the lecture's Table 1
    t = s.toy = ml_collections.ConfigDict()
    t.epsilons = (1e-3, 5e-4)
    t.claims = ml_collections.ConfigDict()  # Definition 2 (Table 1), fixed before the run
    t.claims.sharp_within = 2.0  # 100x²+y⁸ as sharp as 100(x²+y²): φ within 2×
    t.claims.flat_below = 1e6  # and far sharper than x⁸: beyond 10⁶×

    # 2. linear scaling with warm-up (Goyal et al. 2017)
    g = s.scaling = ml_collections.ConfigDict()
    g.base_batch_size = 16
    g.base_learning_rate = 0.05
    g.ks = (1, 2, 4, 8, 16, 32)
    g.warmup_epochs = 3
    g.num_epochs = 20
    g.evals_per_epoch = 4
    g.claims = ml_collections.ConfigDict()  # equivalence margins, fixed before the run
    g.claims.error_margin = 0.02  # "keeps the error": within 2 points (Goyal: 0.14 at 8k)
    g.claims.curve_margin = 0.05  # "curves match": median |Δ log loss| below 0.05

    # 3. noise scale and optimal batch size (Smith & Le 2018; Smith et al. 2018)
    n = s.noise_scale = ml_collections.ConfigDict()
    n.batch_sizes = (2, 4, 8, 16, 32, 64, 128, 256, 512)
    n.learning_rates = (0.025, 0.05, 0.1, 0.2, 0.4)
    n.train_sizes = (1000, 2000, 4000)
    n.size_learning_rate = 0.1
    n.num_epochs = 20
    n.schedule_batch_size = 32  # grow B instead of decaying η
    n.schedule_learning_rate = 0.2
    n.schedule_factor = 4
    n.schedule_epochs = (10, 20)  # η ÷ factor (or B × factor) at these epochs
    n.schedule_num_epochs = 30
    n.claims = ml_collections.ConfigDict()  # fixed before the run
    n.claims.accuracy_margin = 0.02  # growing B "reaches the accuracy": within 2 points

    # 4. three factors: η/B sets the endpoint (Jastrzębski et al. 2017)
    f = s.factors = ml_collections.ConfigDict()
    f.ratios = (1 / 1600, 1 / 400, 1 / 100)  # η/B
    f.batch_sizes = (16, 64, 256)
    f.num_epochs = 30
    f.epsilon = 1e-3
    f.num_minibatches = 16  # batch sharpness
    f.slq_probes = 8
    f.slq_steps = 40
    f.claims = ml_collections.ConfigDict()
    # The corner, fixed before the run by η alone: the grid's η = 2.56 is left out.
    f.claims.max_learning_rate = 1.0
    # "Not on B alone": |c| < 0.2, i.e. quadrupling B along a line of constant η/B changes
    # the measure by less than 4^0.2 = 1.32× (our choice, fixed before the run).
    f.claims.c_margin = 0.2

    # 5. the SDE picture (sharp_minima.dynamics)
    d = s.sde = ml_collections.ConfigDict()
    d.runs = 4000
    d.ratios = (0.005, 0.01, 0.02, 0.04)  # η/B for the stationary spread
    d.temperatures = (0.5, 0.35, 0.25, 0.2)  # double-well occupation
    d.dt = 0.01
    d.occupation_time = 400.0  # simulated time per temperature (× exp(barrier/T) / exp(1/0.2))
    d.escape_depth = 0.5  # both wells: the same depth, curvatures 8 (sharp) and 2 (flat)
    d.escape_ratios = (20.0, 30.0, 40.0, 50.0)  # B/η
    d.escape_steps = 40_000
    d.nqm_dim = 100
    d.claims = ml_collections.ConfigDict()  # equivalence margins, fixed before the run
    d.claims.match_margin = 0.05  # simulation vs closed form: within 5 % (relative)
    d.claims.occupation_margin = 0.02  # P_A vs the Boltzmann / Laplace prediction (absolute)
    d.claims.slope_margin = 0.25  # escape slopes "the same": within ×1.25 (relative)

    # 6. the critical batch size (McCandlish et al. 2018; Shallue et al. 2019)
    k = s.critical = ml_collections.ConfigDict()
    k.batch_sizes = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
    k.learning_rates = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
    k.target_loss = 0.6  # full training-set cross-entropy
    k.max_steps = 16_000
    k.evals_per_epoch = 8
    k.nqm_dim = 1000
    k.nqm_target = 0.01  # × the initial loss
    k.claims = ml_collections.ConfigDict()  # fixed before the run
    k.claims.b_crit_factor = 3.0  # B_crit within 3× of B_simple (McCandlish: an order)
    k.claims.perfect_slope = -0.7  # local slope below −0.7 at the smallest B (ideal −1)
    k.claims.no_gain_slope = -0.3  # and above −0.3 at the largest (no gain: 0)

    def fashion(c):
        c.name = "sgd_noise_fashion"
        c.data.name = "fashion_mnist"
        c.data.max_train = 10_000
        c.model.kwargs.widths = (128, 128)
        c.sgd_noise.critical.target_loss = 0.4

    def paper(c):
        fashion(c)
        c.name = "sgd_noise_paper"
        c.data.max_train = None
        s = c.sgd_noise
        s.seeds = 3
        s.scaling.ks = (1, 2, 4, 8, 16, 32, 64, 128)
        s.noise_scale.batch_sizes = tuple(2**i for i in range(2, 14))
        s.noise_scale.train_sizes = (5000, 15000, 30000, 60000)
        s.critical.batch_sizes = tuple(2**i for i in range(2, 14))
        s.critical.max_steps = 100_000

    def tiny(c):
        c.data.max_train = 256
        c.model.kwargs.widths = (16,)
        s = c.sgd_noise
        s.seeds = 2
        s.curvature_examples = 64
        s.curvature_batch_size = 32
        r = s.rescaling
        r.alphas = (0.5, 1.0, 2.0)
        r.num_epochs = 2
        r.slice_points = 5
        r.trace_matvecs = 12
        g = s.scaling
        g.ks = (1, 2, 4)
        g.num_epochs = 2
        g.warmup_epochs = 1
        g.evals_per_epoch = 2
        n = s.noise_scale
        n.batch_sizes = (8, 16, 32)
        n.learning_rates = (0.05, 0.1)
        n.train_sizes = (128, 256)
        n.num_epochs = 2
        n.schedule_epochs = (1, 2)
        n.schedule_num_epochs = 3
        n.schedule_factor = 2
        n.schedule_batch_size = 16
        f = s.factors
        f.ratios = (1 / 320, 1 / 80)
        f.batch_sizes = (16, 32)
        f.num_epochs = 2
        f.num_minibatches = 4
        f.slq_probes = 2
        f.slq_steps = 8
        d = s.sde
        d.runs = 64
        d.ratios = (0.01, 0.04)
        d.temperatures = (0.5, 0.35)
        d.occupation_time = 5.0
        d.escape_ratios = (10.0, 20.0)
        d.escape_steps = 500
        d.nqm_dim = 10
        k = s.critical
        k.batch_sizes = (8, 16, 32, 64)
        k.learning_rates = (0.1, 0.4)
        k.target_loss = 2.2
        k.max_steps = 60
        k.evals_per_epoch = 2
        k.nqm_dim = 50

    return base.with_variants(c, arg, {"fashion": fashion, "paper": paper, "tiny": tiny})
