"""What every study shares besides its runs (`sharp_minima.studies.runs`) and its claims
(`sharp_minima.studies.claims`): named key streams, table cells, `write_outputs` — the one
place a study's report, results and figures are saved — and `contract`, the documentation of
the four functions every study offers."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import zlib
from collections.abc import Callable

import jax
import numpy as np

from sharp_minima import files, plotting
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import runs

_CONTRACT = {
    "run": """Resumable: called again on the same ``workdir`` it continues an interrupted study and
recomputes nothing that is done; `write_outputs` saves ``report.md``, ``results.json`` and
the figures (PNG and PDF).

Args:
  config: the study's config (``configs/<study>.py`` and its variants).
  workdir: the output folder (one run folder per training run inside).
  data: replaces the config's data set (default: ``train.load_data(config)``).
  log: takes every line of progress (``print``; in a notebook
    `sharp_minima.notebook.ProgressLine`).
  extend: keep a workdir whose finished work was computed under another config, reusing
    what the change leaves valid (`sharp_minima.studies.sections.check_config`; without
    it such a workdir is refused).

Returns:
  The results dict (what ``results.json`` holds, with its arrays), the input of the
  study's ``figures``, ``claims`` and ``report_markdown``.

Raises:
  sharp_minima.train.ConfigError: a bad config (naming the field), or a workdir whose
    finished work was computed under another config (naming what differs).
  sharp_minima.data.DataNotFoundError: the data set is not available.
  sharp_minima.files.WorkdirError: the workdir cannot be used (or another process holds it).
  sharp_minima.studies.runs.NothingToReport: every run diverged (the report is written).""",
    "figures": """Args:
  config: the study's config.
  results: ``run``'s output (or ``results.json`` read back).

Returns:
  ``{name: matplotlib.figure.Figure}``; nothing is saved (a notebook shows them with
  `sharp_minima.notebook.show`).""",
    "claims": """Args:
  config: the study's config.
  results: ``run``'s output.

Returns:
  ``[(claim, verdict, numbers)]``: the verdict "yes", "no", "within noise" or "not tested"
  (`sharp_minima.studies.claims.verdict`), the numbers the evidence in words.""",
    "report_markdown": """Args:
  config: the study's config.
  results: ``run``'s output.
  figure_names: the figures the report lists (default: those ``figures`` draws).

Returns:
  The Markdown text of ``report.md``.""",
}


def contract(fn: Callable) -> Callable:
    """Completes the docstring of a study's ``run``, ``figures``, ``claims`` or
    ``report_markdown`` with the arguments, returns and errors every study shares (written
    once, here); the study's own docstring says what is particular to it.

    Args:
      fn: one of the four functions of a study module.

    Returns:
      ``fn``, its ``__doc__`` completed.

    Raises:
      ValueError: ``fn`` is not one of the four.
    """
    if fn.__name__ not in _CONTRACT:
        raise ValueError(f"{fn.__name__} is not a study function: {', '.join(_CONTRACT)}")
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\n" + _CONTRACT[fn.__name__]
    return fn


def key_streams(seed: int, *names: str) -> dict[str, jax.Array]:
    """Independent keys named after what they are for, from one root ``key(seed)``.

    Each stream is ``fold_in(key(seed), crc32(name))``: adding a stream never changes the
    others, and no stream coincides with ``jax.random.split(key(seed), n)``, which the trainer
    uses for its init/data/augmentation keys.

    Args:
      seed: the root seed.
      *names: the streams' names.

    Returns:
      ``{name: key}``.

    >>> keys = key_streams(0, "subset", "sharpness")
    >>> sorted(keys), bool((jax.random.key_data(keys["subset"])
    ...                     != jax.random.key_data(keys["sharpness"])).any())
    (['sharpness', 'subset'], True)
    """
    root = jax.random.key(seed)
    return {n: jax.random.fold_in(root, zlib.crc32(n.encode()) & 0x7FFFFFFF) for n in names}


def mean_std(summary: dict, key: str, group, digits: int = 2) -> str:
    """``"mean ± std"`` (or ``"mean"`` for one run, ``"—"`` when absent) of a field of
    `sharp_minima.studies.runs.aggregate`'s summary, for a table cell.

    Args:
      summary: `aggregate`'s output.
      key: the field.
      group: the group.
      digits: significant digits.

    Returns:
      The cell's text.
    """
    stat = summary.get(group, {}).get(key)
    if not isinstance(stat, dict):
        return "—"
    mean, std = stat["mean"], stat["std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if stat["n"] > 1 else f"{mean:.{digits}f}"


INLINE_SIZE = 64  # arrays up to this many numbers stay in results.json
FIGURE_STAMP = ".figures-stamp"  # what the saved figures were drawn from (`_figure_stamp`)


def _figure_stamp(plain: dict, arrays: dict) -> str:
    """A hash of everything a study's figures are drawn from: its results, the library's
    source (the drawing code) and matplotlib's version."""
    import matplotlib

    h = hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode())
    for k in sorted(arrays):
        h.update(k.encode() + np.ascontiguousarray(arrays[k]).tobytes())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(n for n in names if n.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    h.update(matplotlib.__version__.encode())
    return h.hexdigest()


def _move_arrays(obj, path: str, arrays: dict):
    """``obj`` with every array of more than `INLINE_SIZE` numbers moved into ``arrays``."""
    if isinstance(obj, dict):
        return {
            k: _move_arrays(v, f"{path}/{k}" if path else str(k), arrays) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [_move_arrays(v, f"{path}/{i}", arrays) for i, v in enumerate(obj)]
    if hasattr(obj, "shape") and np.size(obj) > INLINE_SIZE:
        arrays[path] = np.asarray(obj)
        return f"results.npz:{path}"
    return obj


def table_cell(value) -> str:
    """``value`` as the text of one Markdown table cell: ``|`` escaped, no line breaks.

    Args:
      value: anything printable.

    Returns:
      The cell's text.
    """
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(header, rows) -> list[str]:
    """The lines of a Markdown table; every cell goes through `table_cell`.

    Args:
      header: the column titles.
      rows: the rows' cells.

    Returns:
      The table's lines.
    """
    line = lambda cells: "| " + " | ".join(table_cell(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "| " + " | ".join("---" for _ in header) + " |", *map(line, rows)]


def smoke_test(config) -> bool:
    """Whether ``config`` is a smoke test (a ``tiny`` variant): its report gives no verdicts.

    Args:
      config: a study's config (or None).

    Returns:
      ``config.smoke_test`` (False when absent).
    """
    return bool(config is not None and config.get("smoke_test", False))


def figure_formats(config) -> tuple[str, ...]:
    """The formats a study saves its figures in: PNG and PDF, PNG alone for a smoke test (a
    tiny config's figures are for a glance; a PDF costs as much time to draw again as the PNG).

    Args:
      config: a study's config (or None).

    Returns:
      File extensions, e.g. ``("png", "pdf")``.
    """
    return ("png",) if smoke_test(config) else plotting.FORMATS


def write_outputs(
    config,
    results: dict,
    workdir: str,
    log=print,
    *,
    claims: Callable,
    figures: Callable,
    report: Callable,
) -> dict:
    """Saves a study's outputs, all in ``workdir``: ``report.md``, ``results.json`` (arrays of
    more than `INLINE_SIZE` numbers go to ``results.npz``, named by their path in the results,
    which ``results.json`` gives as ``"results.npz:<path>"``) and each figure as PNG and PDF
    (PNG alone for a smoke test: `figure_formats`), on process 0, atomically; prints the
    claims. A figure already saved from the same results by the same library source and
    matplotlib (``.figures-stamp``) is not saved again.

    Args:
      config: the study's config.
      results: what its ``run`` measured.
      workdir: the output folder.
      log: takes the claims' lines.
      claims: the study's ``claims(config, results) -> [(claim, verdict, numbers)]`` (a
        verdict of `sharp_minima.studies.claims.VERDICTS`, or a bool).
      figures: ``figures(config, results) -> {name: Figure}`` (draws, saves nothing).
      report: ``report(config, results, figure_names) -> str``, the text of ``report.md``
        (sees ``results["claims"]``; ``figure_names``: the figures drawn and saved, so the
        report names only figures that exist).

    Returns:
      ``results`` with ``"claims"`` (and ``"diverged"``) added.

    Raises:
      sharp_minima.studies.runs.NothingToReport: no claim could be tested because runs
        diverged (after everything is written).
    """
    found = claims_lib.findings(claims(config, results))
    diverged = runs.diverged_runs(workdir)
    results = {
        **results,
        "claims": [f._asdict() for f in found],
        "diverged": diverged,
    }
    # Nothing to report: runs diverged and no claim could be tested (figures would be empty).
    nothing = bool(diverged) and all(f.verdict == claims_lib.NOT_TESTED for f in found)
    names = []
    formats = figure_formats(config)
    if jax.process_index() == 0:
        arrays: dict[str, np.ndarray] = {}
        plain = _move_arrays(results, "", arrays)
        files.write_json(os.path.join(workdir, "results.json"), plain)
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            files.write_atomic(os.path.join(workdir, "results.npz"), buf.getvalue())
        # A resumed run whose results and drawing code are unchanged keeps its saved figures
        # (saving PNG and PDF is most of a resume's time).
        stamp, stamp_path = _figure_stamp(plain, arrays), os.path.join(workdir, FIGURE_STAMP)
        kept = os.path.exists(stamp_path) and open(stamp_path).read() == stamp
        for name, fig in ({} if nothing else figures(config, results)).items():
            saved = [os.path.join(workdir, f"{name}.{ext}") for ext in formats]
            if not (kept and all(os.path.exists(p) for p in saved)):
                plotting.save(fig, workdir, name, formats)
            names.append(name)
        files.write_atomic(stamp_path, stamp)
        text = report(config, results, names).rstrip("\n") + "\n"
        if diverged:
            text += "\n" + "\n".join(diverged_section(diverged)) + "\n"
        files.write_atomic(os.path.join(workdir, "report.md"), text)
    for d in diverged:
        log(f"diverged: run {d['run']}{_at_step(d)} (not retried; see report.md)")
    width = max(map(len, claims_lib.VERDICTS))
    for f in found:
        log(f"[{f.verdict:<{width}}] {f.claim}: {f.numbers}")
    if found and smoke_test(config):
        log("smoke test (tiny config): the verdicts say nothing about the sources' claims")
    elif found:
        log(f"verdicts: {claims_lib.count_verdicts(found)}")
    if nothing:
        raise runs.NothingToReport(
            f"nothing to report: {_plural(len(diverged), 'run')} diverged ("
            + ", ".join(d["run"] + _at_step(d) for d in diverged)
            + f") and no claim could be tested; wrote {workdir}/report.md"
        )
    shown = f" and {', '.join(names)} (.{'/.'.join(formats)})" if names else ""
    log(f"wrote {workdir}/report.md, results.json{shown}")
    return results


def _at_step(d: dict) -> str:
    return f" at step {d['step']}" if d.get("step") is not None else ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def diverged_section(diverged: list[dict]) -> list[str]:
    """The report's ``## Diverged runs`` section: each run that diverged (NaN/Inf), where,
    and its message (`sharp_minima.studies.runs.diverged_runs`).

    Args:
      diverged: `sharp_minima.studies.runs.diverged_runs`'s records.

    Returns:
      The section's Markdown lines (none when no run diverged).
    """
    rows = [(d["run"], "—" if d["step"] is None else d["step"], d["message"]) for d in diverged]
    return [
        "## Diverged runs",
        "",
        "The training loss of these runs became NaN or Inf; they are reported, never retried "
        "(delete a run's folder to retry it). Claims that needed them read *not tested*.",
        "",
        *markdown_table(("run", "step", "message"), rows),
    ]
