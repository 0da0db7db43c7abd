"""One module per source work: runs, measurements, reports, figures and the paper's numbers.

**The study contract.** Every study module offers

- ``run(config, workdir, *, data=None, log=print, extend=False) -> results``: the whole
  study into ``workdir``, resumable — calling it again on the same workdir continues an
  interrupted study and recomputes nothing that is done (runs resume from their checkpoints,
  measurements are read from their caches); ``data`` replaces the config's data set (e.g.
  one loaded in a notebook); ``log`` takes every line of progress; a workdir whose finished
  work was computed under another config is refused unless ``extend``.
- ``figures(config, results) -> dict[str, matplotlib.figure.Figure]``: draws from
  ``results`` alone and saves nothing, so a notebook shows
  ``study.figures(config, results)["name"]`` inline.
- ``report_markdown(config, results) -> str``: ``report.md`` (the scale, the claims, the
  paper's numbers beside this run's, the figures drawn).
- ``claims(config, results) -> [(claim, verdict, numbers)]``: a verdict per claim of the
  paper this run tests (`claims`: "yes" / "no" only by more than the numbers' noise, else
  "within noise"; "not tested" when its runs diverged), with the numbers behind it.

Every study is a `sections.Study`: a tuple of `sections.Section` (one file each in the
packages ``sgd_noise`` and ``visualize_generalization``; one section in a small study), run
by the one driver, which ends with `common.write_outputs`, the one place a study's
``report.md``, ``results.json`` (+ ``results.npz`` for large arrays) and figures (PNG + PDF)
are saved, the diverged runs are named, and a study with nothing to report stops
(`runs.NothingToReport`). `sections.contract_functions` makes the four functions above.
Every figure is made by `sharp_minima.plotting.figure` (constrained layout). Studies are
built from `runs` (derived run configs, run folders, training that records a diverged run,
measurement caches, aggregation over seeds, logged series) and the library's measurements;
they add no numerical kernels or training loops and never import one another.
``experiments/<study>.py`` only parses flags and calls ``run``.

Figures: a figure that belongs to one study is drawn in that study's module; figures of
library measurements that several studies (and notebooks) use are in `sharp_minima.plotting`.

- `keskar` — Keskar et al. (2017): large-batch training, ε-sharpness, parametric plots.
- `sharpest_directions` — Jastrzębski et al. (2019), Sec. 3: the top Hessian eigenvalues
  along SGD, the step against the sharpest directions, full-batch GD, SGD variants.
- `nudged_sgd` — Jastrzębski et al. (2019), Sec. 4: Nudged-SGD against SGD (Table 1).
- `visualize_generalization` — Huang et al. (2020): bad minima, decision boundaries, basin
  volumes, loss surfaces, t-SNE of the trajectory, pinched rings, optimizers vs linear.
- `sgd_noise` — the lecture notes "Towards Understanding SGD": parameterisation and flatness,
  toy sharpness, linear scaling with warm-up, noise scale and B_opt, three factors, the SDE
  picture, the critical batch size (populations trained in one vmapped program).
- `curvature_demo` — the top Hessian eigenvalues of a small MLP tracked along training.
"""
