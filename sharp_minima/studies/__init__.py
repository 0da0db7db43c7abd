"""One module per source work: runs, measurements, reports, figures and the paper's numbers.

Each study is ``run(config, workdir, *, data=None, log=print) -> dict`` (resumable: calling it
again on the same workdir continues and recomputes nothing that is done), importable from a
notebook; ``experiments/<study>.py`` only parses flags and calls it.

- `keskar` — Keskar et al. (2017): large-batch training, ε-sharpness, parametric plots.
- `curvature_demo` — the top Hessian eigenvalues of a small MLP tracked along training.
"""
