"""Section ``label_noise``: SGD, SAM and ASAM on training labels with symmetric noise.

Baek, Kolter & Raghunathan (ICLR 2024) find SAM's largest gains under label noise, at the
early-stopping epoch: SAM fits the clean examples before the noisy ones for longer. A
fraction ``label_noise.fraction`` of the training labels (and of the validation split held
out of them; never of the test set) is replaced by another class drawn uniformly; each arm
is scored by its test accuracy at the epoch of its best (noisy) validation accuracy.
"""

from __future__ import annotations

from sharp_minima import plotting, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs
from sharp_minima.studies.claims import Claim
from sharp_minima.studies.common import markdown_table
from sharp_minima.studies.sam import kit
from sharp_minima.studies.sections import Section

BAEK = "Baek, Kolter & Raghunathan (ICLR 2024), abstract and Sec. 3"
SAM_GAIN = Claim(
    statement="with 40 % label noise, SAM's early-stopped test accuracy is higher than SGD's",
    source=f"{BAEK}; Foret et al. (ICLR 2021), Sec. 3.3",
    quantity="test accuracy at the best validation epoch, SAM − SGD (paired by seed), "
    "predicted > the threshold",
    noise=claims_lib.SEEDS,
    threshold="sam_study.label_noise.claims.gain",
    origin="the sources' direction (any gain), fixed before the run",
    min_seeds=3,
)
ASAM_GAIN = Claim(
    statement="with 40 % label noise, ASAM's early-stopped test accuracy is higher than SGD's",
    source=f"{BAEK}; Kwon et al. (ICML 2021), Sec. 5",
    quantity="test accuracy at the best validation epoch, ASAM − SGD (paired by seed), "
    "predicted > the threshold",
    noise=claims_lib.SEEDS,
    threshold="sam_study.label_noise.claims.gain",
    origin="the sources' direction (any gain), fixed before the run",
    min_seeds=3,
)
# The sources' CIFAR-10 numbers (test error, %), beside ours in the report.
SOURCES = (
    ("Foret et al. 2021, Table 1", "WRN-28-10, basic augmentation, 200 epochs", "3.5", "2.7", "—"),
    (
        "davda54/sam README",
        "WRN-16-8, label smoothing + cutout, 200 epochs",
        "3.20",
        "2.86",
        "2.55",
    ),
)


def arms(config) -> list[kit.Arm]:
    s, noise = config.sam_study, ("data.options.label_noise", config.sam_study.label_noise.fraction)
    plain = kit.Arm("noisy_sgd", "SGD", (noise,))
    sam, asam = kit.sam(s.rho, prefix="noisy_"), kit.sam(s.asam_rho, adaptive=True, prefix="noisy_")
    return [plain] + [kit.Arm(a.name, a.label, a.changes + (noise,)) for a in (sam, asam)]


def validate(config) -> None:
    train.check_numbers(config, "sam_study.label_noise.fraction", low=0, low_open=True, high=1,
                        high_open=True)  # fmt: skip
    train.check_numbers(config, "sam_study.label_noise.claims.gain", low=-1, high=1)


def prepare(ctx):
    """The noisy data set (the study's split, labels flipped), loaded before any training."""
    return train.load_data(
        runs.derive(
            ctx.config, {"data.options.label_noise": ctx.config.sam_study.label_noise.fraction}
        )
    )


def run(ctx) -> dict:
    data = ctx.prepared
    return {
        "noisy_fraction": float(data.noisy_train.mean()),
        "arms": kit.Runs(ctx, data, ctx.shared).train_all(arms(ctx.config)),
    }


def claims(config, results) -> list:
    a = results["arms"]
    names = [x.name for x in arms(config)]
    threshold = SAM_GAIN.threshold_of(config)
    out = []
    for claim, name in ((SAM_GAIN, names[1]), (ASAM_GAIN, names[2])):
        gain, noise, n = kit.paired(a[name], a[names[0]], "test_accuracy")
        out.append(
            claim.test(
                gain - threshold,
                noise,
                f"{a[name]['label']} {kit.mean_pm(a[name], 'test_accuracy')} % vs SGD "
                f"{kit.mean_pm(a[names[0]], 'test_accuracy')} %: gain {100 * gain:+.1f} points, "
                f"noise unit {100 * noise:.1f}",
                seeds=n,
            )
        )
    return out


def report(config, results) -> list[str]:
    a = results["arms"]
    rows = [
        (
            arm["label"],
            kit.mean_pm(arm, "test_accuracy"),
            kit.mean_pm(arm, "best_epoch", scale=1, digits=0),
            kit.mean_pm(arm, "final_test_accuracy"),
            kit.mean_pm(arm, "final_train_accuracy"),
        )
        for arm in a.values()
    ]
    return [
        f"{100 * results['noisy_fraction']:.1f} % of the training labels are wrong. Test "
        "accuracy (%, clean test set) at the epoch of the best validation accuracy (the "
        "validation labels are as noisy as the training labels), mean ± standard error over "
        "seeds; the final epoch's test and (noisy) training accuracy show the memorisation "
        "that early stopping avoids.",
        "",
        *markdown_table(
            ("arm", "early-stopped test acc.", "best epoch", "final test acc.", "final train acc."),
            rows,
        ),
        "",
        "The sources' CIFAR-10 test errors (%, clean labels; the model zoo has no WRN, so "
        "these are context, not a target):",
        "",
        *markdown_table(("source", "setting", "SGD", "SAM", "ASAM"), SOURCES),
    ]


def figures(config, results) -> dict:
    fig = plotting.figure((11, 4))
    ax_test, ax_train = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, arm in enumerate(results["arms"].values()):
        for ax, field in ((ax_test, "test_accuracy"), (ax_train, "train_accuracy")):
            curve = kit.mean_curve(arm, "curve", field)
            if curve is not None:
                ax.plot(curve[0], 100 * curve[1], color=f"C{i}", label=arm["label"])
    ax_test.set_title("test accuracy (%, clean labels)")
    ax_train.set_title("training accuracy (%, noisy labels)")
    for ax in (ax_test, ax_train):
        ax.set_xlabel("epoch")
    ax_test.legend(fontsize=8)
    fig.suptitle(f"{100 * config.sam_study.label_noise.fraction:g} % label noise (mean over seeds)")
    return {"label_noise": fig}


SECTION = Section(
    name="label_noise",
    title="SAM and ASAM under label noise",
    run=run,
    report=report,
    claims=claims,
    figures=figures,
    validate=validate,
    prepare=prepare,
)
