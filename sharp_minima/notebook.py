"""What a notebook shows: a run's progress as one line updated in place, figures drawn inline,
and a study's claims as a table.

The notebooks in ``experiments/notebooks/`` call these three; they work in Jupyter, Colab and
VS Code (and in a notebook executed headless by nbclient or papermill, whose stored output is
the final state). Outside IPython they fall back to printing, so a script may call them too.
IPython is imported only when a function is called, never at import.

    from sharp_minima import notebook

    # study: any module of sharp_minima.studies
    results = study.run(config, workdir, log=notebook.ProgressLine())
    notebook.show_claims(study.claims(config, results), config)
    notebook.show(study.figures(config, results))
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Mapping

from matplotlib.figure import Figure

from sharp_minima.train.console import fmt_time


def _ipython_display():
    """IPython's ``display`` inside a running kernel, else None."""
    try:
        from IPython import get_ipython  # noqa: PLC0415
        from IPython.display import display  # noqa: PLC0415
    except ImportError:
        return None
    shell = get_ipython()
    return display if shell is not None and hasattr(shell, "kernel") else None


class ProgressLine:
    """A study's ``log``: every line replaces the previous one in a single output line,
    prefixed with the time since the first line (a study logs hundreds of lines of progress;
    a notebook cell should not grow by each of them).

    Every line is kept in ``lines`` (print ``"\\n".join(progress.lines)`` to read them all),
    and a line containing one of ``keep`` (by default a diverged run or a warning) is also
    printed on its own above the updating line, so it stays visible.

    Args:
      keep: substrings that mark a line to print on its own as well (case-insensitive).

    Outside an IPython kernel every line is printed.
    """

    def __init__(self, keep: tuple[str, ...] = ("diverged:", "warning:")):
        self.lines: list[str] = []
        self.keep = tuple(k.lower() for k in keep)
        self._display = _ipython_display()
        self._handle = None
        self._start: float | None = None

    def __call__(self, line: str) -> None:
        line = str(line)
        self.lines.append(line)
        if self._display is None:
            print(line, flush=True)
            return
        if self._start is None:
            self._start = time.perf_counter()
        if any(k in line.lower() for k in self.keep):
            print(line, flush=True)
        text = f"[{fmt_time(time.perf_counter() - self._start)}] {line}"
        bundle = {"text/plain": text}
        if self._handle is None:
            self._handle = self._display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)


def png(fig: Figure, dpi: int = 80) -> bytes:
    """``fig`` rendered as PNG bytes (no pyplot, no backend switch).

    Args:
      fig: the figure.
      dpi: resolution.

    Returns:
      The PNG file's bytes.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def show(figures: Figure | Mapping[str, Figure], dpi: int = 80) -> None:
    """Draws a figure, or every figure of a study's ``figures(config, results)`` dict under
    its name, inline as a PNG image.

    A bare `matplotlib.figure.Figure` as a cell's value is drawn only when an inline backend
    registered its formatter (it prints ``<Figure size ...>`` on some kernels); this always
    draws it. Outside IPython it prints the figures' names.

    Args:
      figures: one `Figure` or a dict name -> `Figure`.
      dpi: resolution of the images (80 keeps a notebook with ten figures under 1 MB).
    """
    display = _ipython_display()
    items = [("", figures)] if isinstance(figures, Figure) else list(figures.items())
    for name, fig in items:
        if display is None:
            print(f"figure {name!r}" if name else "figure", fig)
            continue
        if name:
            display({"text/markdown": f"**{name}**", "text/plain": name}, raw=True)
        data = base64.b64encode(png(fig, dpi)).decode("ascii")
        display({"image/png": data, "text/plain": f"<figure {name}>"}, raw=True)


def show_claims(claims: list, config=None) -> None:
    """A study's claims as the report's table (a verdict per claim, with its source and its
    numbers), rendered as Markdown (printed outside IPython).

    Args:
      claims: ``study.claims(config, results)`` (or ``results["claims"]``).
      config: the study's config (a tiny config's run is a smoke test: no verdict counts).
    """
    from sharp_minima.studies import claims as claims_lib  # noqa: PLC0415 - no study needed

    text = "\n".join(
        claims_lib.claims_table(claims, smoke_test=bool(config and config.get("smoke_test")))
    )
    display = _ipython_display()
    if display is None:
        print(text)
    else:
        display({"text/markdown": text, "text/plain": text}, raw=True)
