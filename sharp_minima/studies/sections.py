"""Sections, and the one driver every study runs on.

A study is a `Study`: its name, the title of its report, and a tuple of `Section`s — the only
list of what the study does. A section holds everything of one part of a study: its name
(what ``config.sections`` selects), its title, its config checks, its ``run``, its claims,
its part of the report and its figures. Adding a section is adding one file and one entry in
the tuple; nothing else names it.

`Study.run` is every study's ``run``:

1. checks the config before any work: the study's own checks, the section names
   (`section_names`: a tuple, or a comma list from the command line), each selected
   section's ``validate``;
2. refuses to overwrite finished work computed under another config (`check_config`), then
   holds the workdir's lock;
3. loads the data once when a selected section needs it, builds what the sections share
   (``Study.prepare``) and lets every selected section ``prepare`` (a data set too small, a
   second data set to load: it fails now, before any training);
4. runs the sections in the study's order, one console line each, and records each finished
   section in ``study.json``;
5. saves the outputs with `sharp_minima.studies.common.write_outputs`: the claims (prefixed
   ``[i]`` by the section's place in a study of several sections), the report assembled from
   the sections' parts, and the figures — whose names the report lists, so a report can only
   name a figure that was drawn.

The results of a study of several sections are ``{"config": name, "sections": {name:
section results}, ...}``; a study of one section returns that section's results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax

from sharp_minima import files, train
from sharp_minima.studies import claims as claims_lib
from sharp_minima.studies import common, runs

RECORD = "study.json"  # the study, the config of its finished work, the finished sections
# Fields that do not change what a study computes: changing them never refuses a workdir
# (nor do a study's claim thresholds, ``<study>.claims.*``: they judge the results).
NOT_COMPARED = (
    "sections",
    "num_devices",
    "progress",
    "smoke_test",
    "tensorboard",
    "data.data_dir",
    "data.idx_dir",
    "data.manual_dir",
    "data.allow_download",
)


def _no_claims(config, results) -> list:
    """A section that tests no claim.

    Args:
      config: the study's config.
      results: the section's results.

    Returns:
      No claims.
    """
    return []


def _no_figures(config, results) -> dict:
    """A section that draws no figure.

    Args:
      config: the study's config.
      results: the section's results.

    Returns:
      No figures.
    """
    return {}


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of a study, whole.

    Attributes:
      name: what ``config.sections`` selects (and the key of its results).
      title: the heading of its part of the report.
      run: ``run(ctx: Context) -> dict``, the section's results (resumable: measurements
        cached in ``ctx.cache`` or in run folders).
      report: ``report(config, results) -> [Markdown lines]``, its part of ``report.md``.
      claims: ``claims(config, results) -> [(claim, verdict, numbers)]``.
      figures: ``figures(config, results) -> {name: Figure}`` (draws, saves nothing).
      validate: ``validate(config)``: raises `sharp_minima.train.ConfigError` before any
        work when the section's fields make no sense.
      prepare: ``prepare(ctx) -> anything``, called for every selected section before the
        first one runs (checks against the data, a data set of its own); its value is
        ``ctx.prepared`` in ``run``.
      needs_data: whether ``run`` uses the study's data set (``ctx.data``).
    """

    name: str
    title: str
    run: Callable[[Context], dict]
    report: Callable[[Any, dict], list]
    claims: Callable[[Any, dict], list] = _no_claims
    figures: Callable[[Any, dict], dict] = _no_figures
    validate: Callable[[Any], None] | None = None
    prepare: Callable[[Context], Any] | None = None
    needs_data: bool = True


@dataclasses.dataclass
class Context:
    """What a section's ``run`` works with.

    Attributes:
      config: the study's config.
      workdir: the study's folder.
      log: takes every line of progress.
      study: the study's name.
      data: the study's data set (None when no selected section needs it).
      shared: what ``Study.prepare`` built for every section (e.g. a model and its loss).
      prepared: what this section's ``prepare`` returned.
    """

    config: Any
    workdir: str
    log: Callable[[str], None]
    study: str
    data: Any = None
    shared: Any = None
    prepared: Any = None
    _cache: runs.Cache | None = None

    @property
    def cache(self) -> runs.Cache:
        """The study's measurement cache, ``<workdir>/<study>.json`` (`runs.Cache`)."""
        if self._cache is None:
            self._cache = runs.Cache(os.path.join(self.workdir, f"{self.study}.json"))
        return self._cache


def section_names(value) -> tuple[str, ...]:
    """``config.sections`` as names: a tuple of names, or comma lists within it (the command
    line's ``--config.sections=toy,sde`` arrives as ``("toy,sde",)``).

    Args:
      value: the field's value (a tuple of strings, or one string).

    Returns:
      The names, in the order given, blanks dropped.

    >>> section_names(("toy,sde",)), section_names("rings"), section_names(("a", " b"))
    (('toy', 'sde'), ('rings',), ('a', 'b'))
    """
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


def _leaves(tree, prefix: str = "") -> dict[str, Any]:
    """``{dotted path: value}`` of a nested dict's leaves (JSON values)."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, path + "."))
        else:
            out[path] = v
    return out


def compared_fields(config) -> dict[str, Any]:
    """The config's fields that decide what a study computes (all but `NOT_COMPARED`), as
    ``{dotted path: JSON value}``.

    Args:
      config: a study's config.

    Returns:
      The fields' values, as JSON gives them back.
    """
    plain = json.loads(json.dumps(config.to_dict(), default=files.to_builtin))
    # SAM off (sam.rho = 0): its settings change nothing, as in work recorded before they existed.
    sam_off = not (plain.get("sam") or {}).get("rho")
    return {
        k: v
        for k, v in _leaves(plain).items()
        if not any(k == n or k.startswith(n + ".") for n in NOT_COMPARED)
        and ".claims." not in f".{k}"  # thresholds judge results, they change no run
        and not (sam_off and k.startswith("sam."))
    }


def config_changes(old: dict, new: dict) -> list[str]:
    """``"path: old → new"`` for every field that differs (or exists in only one).

    Args:
      old: `compared_fields` of the recorded config.
      new: `compared_fields` of the config now.

    Returns:
      The differences, by path.
    """
    missing = object()
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, missing), new.get(k, missing)
        if a != b:
            show = lambda v: "(none)" if v is missing else json.dumps(v, ensure_ascii=False)  # noqa: E731
            out.append(f"{k}: {show(a)} → {show(b)}")
    return out


def check_config(study: str, config, workdir: str, *, extend: bool = False) -> dict:
    """The record to continue ``workdir`` with, or a refusal when its finished work was
    computed under another config.

    ``<workdir>/study.json`` names the study, the config of its finished work
    (`compared_fields`) and the finished sections. A workdir with no finished work accepts
    any config. With finished work, a changed config is refused unless ``extend``: then
    the workdir is kept, every run and measurement whose settings did not change is reused
    (caches and run folders are keyed on what they depend on) and the rest is computed.

    Args:
      study: the study's name.
      config: the config about to run.
      workdir: the study's folder.
      extend: keep a workdir whose finished work used another config.

    Returns:
      ``{"study", "config", "finished"}`` (``finished`` emptied when ``extend`` keeps a
      changed config).

    Raises:
      sharp_minima.train.ConfigError: the workdir holds another study, or finished work
        under another config (one line: what differs, how to start afresh or extend).
    """
    new = {"study": study, "config": compared_fields(config), "finished": []}
    path = os.path.join(workdir, RECORD)
    if not os.path.exists(path):
        return new
    with open(path) as f:
        old = json.load(f)
    if old.get("study") != study:
        raise train.ConfigError(
            f"{workdir} holds the study {old.get('study')!r}, not {study!r}; use another workdir"
        )
    changes = config_changes(old.get("config", {}), new["config"])
    if not changes:
        return {**new, "finished": list(old.get("finished", []))}
    if old.get("finished") and not extend:
        shown = "; ".join(changes[:4]) + (
            f"; and {len(changes) - 4} more" if len(changes) > 4 else ""
        )
        raise train.ConfigError(
            f"{workdir} holds finished work ({', '.join(old['finished'])}) computed under "
            f"another config ({shown}): start afresh in another workdir (or delete this one), "
            "or extend this one with --extend (run(..., extend=True)): it reuses what the "
            "change leaves valid and computes the rest"
        )
    return new


def _write_record(workdir: str, record: dict) -> None:
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, RECORD), record)


@dataclasses.dataclass(frozen=True)
class Study:
    """A study: its sections and what they share. `run`, `claims`, `figures` and
    `report_markdown` are the study contract (`sharp_minima.studies`).

    Attributes:
      name: the study's name (its measurement cache is ``<workdir>/<name>.json``).
      title: ``title(config) -> str``, the report's first heading.
      sections: the sections, in the order they run and report.
      validate: ``validate(config)``: the study's own checks, before any work.
      load_data: ``load_data(config) -> Dataset`` (default `sharp_minima.train.load_data`),
        when a selected section needs data and none was given.
      prepare: ``prepare(config, data) -> shared``: what the sections share (a model, its
        loss, the data on the device), built once when data was loaded.
      header: ``header(config, results) -> [Markdown lines]`` after the report's title.
      describe: ``describe(ctx) -> dict``: entries added to the results of a study of
        several sections (e.g. the data set's size).
    """

    name: str
    title: Callable[[Any], str]
    sections: tuple[Section, ...]
    validate: Callable[[Any], None] | None = None
    load_data: Callable[[Any], Any] | None = None
    prepare: Callable[[Any, Any], Any] | None = None
    header: Callable[[Any, dict], list] | None = None
    describe: Callable[[Context], dict] | None = None

    def __post_init__(self):
        names = [s.name for s in self.sections]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"study {self.name!r}: sections need distinct names, got {names}")

    @property
    def several(self) -> bool:
        """Whether the study has several sections (selected by ``config.sections``)."""
        return len(self.sections) > 1

    def selected(self, config) -> tuple[Section, ...]:
        """The sections ``config.sections`` selects, in the study's order (every section of
        a study of one).

        Args:
          config: the study's config.

        Returns:
          The sections.

        Raises:
          sharp_minima.train.ConfigError: an unknown or repeated name, or none selected.
        """
        if not self.several:
            return self.sections
        names = section_names(config.sections)
        valid = [s.name for s in self.sections]
        unknown = [n for n in names if n not in valid]
        twice = sorted({n for n in names if names.count(n) > 1})
        problem = (
            f"no section {', '.join(map(repr, unknown))}"
            if unknown
            else f"{', '.join(twice)} named twice"
            if twice
            else "no section named"
            if not names
            else None
        )
        if problem:
            raise train.ConfigError(
                f"config.sections: {problem}; the sections are {', '.join(valid)} (e.g. "
                f"--config.sections={valid[0]},{valid[-1]})"
            )
        return tuple(s for s in self.sections if s.name in names)

    def check(self, config) -> tuple[Section, ...]:
        """The config checks that come before any work: the study's own, the section names,
        each selected section's.

        Args:
          config: the study's config.

        Returns:
          The selected sections.

        Raises:
          sharp_minima.train.ConfigError: naming the field.
        """
        if self.validate is not None:
            self.validate(config)
        chosen = self.selected(config)
        for s in chosen:
            if s.validate is not None:
                s.validate(config)
        return chosen

    def run(self, config, workdir: str, *, data=None, log=print, extend: bool = False) -> dict:
        """The study into ``workdir`` (see the module docstring for the steps).

        Args:
          config: the study's config.
          workdir: the output folder.
          data: replaces the data set ``load_data`` would load.
          log: takes every line of progress.
          extend: keep a workdir whose finished work used another config (`check_config`).

        Returns:
          The results (with ``"claims"`` and ``"diverged"``).

        Raises:
          sharp_minima.train.ConfigError: a bad config, or finished work under another one.
        """
        chosen = self.check(config)
        check_config(self.name, config, workdir, extend=extend)  # a refusal touches nothing
        # One lock per run: in a multi-process run process 0 holds it (it alone writes).
        main = jax.process_index() == 0
        with files.workdir_lock(workdir, log=log) if main else contextlib.nullcontext():
            record = check_config(self.name, config, workdir, extend=extend)
            _write_record(workdir, record)
            ctx = Context(config, workdir, log, self.name)
            if any(s.needs_data for s in chosen):
                ctx.data = data if data is not None else (self.load_data or train.load_data)(config)
                ctx.shared = self.prepare(config, ctx.data) if self.prepare else None
            prepared = {s.name: s.prepare(ctx) for s in chosen if s.prepare is not None}
            out = {}
            for s in chosen:
                if self.several:
                    log(f"== section {self._number(s)}. {s.title}")
                ctx.prepared = prepared.get(s.name)
                out[s.name] = s.run(ctx)
                done = set(record["finished"]) | {s.name}
                record["finished"] = [t.name for t in self.sections if t.name in done]
                _write_record(workdir, record)
            if self.several:
                results = {
                    "config": config.name,
                    **(self.describe(ctx) if self.describe else {}),
                    "sections": out,
                }
            else:
                results = out[self.sections[0].name]
            return common.write_outputs(
                config,
                results,
                workdir,
                log,
                claims=self.claims,
                figures=self.figures,
                report=self.report_markdown,
            )

    def _number(self, section: Section) -> int:
        return next(i for i, s in enumerate(self.sections) if s.name == section.name)

    def _parts(self, results: dict):
        """``(section, its results)`` for every section in ``results``, in order."""
        if not self.several:
            yield self.sections[0], results
            return
        for s in self.sections:
            if s.name in results["sections"]:
                yield s, results["sections"][s.name]

    def claims(self, config, results: dict) -> list:
        r"""Every section's claims, ``[i]``-prefixed in a study of several sections.

        Args:
          config: the study's config.
          results: the study's results.

        Returns:
          `sharp_minima.studies.claims.Finding`\ s.
        """
        out = []
        for s, res in self._parts(results):
            prefix = f"[{self._number(s)}] " if self.several else ""
            out += [
                f._replace(claim=prefix + f.claim)
                for f in claims_lib.findings(s.claims(config, res))
            ]
        return out

    def figures(self, config, results: dict) -> dict:
        """Every section's figures (drawn, nothing saved).

        Args:
          config: the study's config.
          results: the study's results.

        Returns:
          ``{name: Figure}``.

        Raises:
          ValueError: two sections draw figures of the same name.
        """
        out = {}
        for s, res in self._parts(results):
            for name, fig in s.figures(config, res).items():
                if name in out:
                    raise ValueError(f"{self.name}: two sections draw a figure {name!r}")
                out[name] = fig
        return out

    def report_markdown(self, config, results: dict, figure_names=None) -> str:
        """``report.md``: the title, the study's header, the claims, each section's part
        (headed ``## i. title`` in a study of several sections) and the figures' names.

        Args:
          config: the study's config.
          results: the study's results (with ``"claims"``).
          figure_names: the figures drawn; default: the names `figures` returns.

        Returns:
          The Markdown text.
        """
        if figure_names is None:
            figure_names = list(self.figures(config, results))
        lines = [f"# {self.title(config)}", ""]
        if self.header is not None:
            lines += [*self.header(config, results), ""]
        smoke = common.smoke_test(config)  # read even without claims: a report's kind
        if results.get("claims"):
            lines += [*claims_lib.claims_table(results["claims"], smoke_test=smoke), ""]
        for s, res in self._parts(results):
            if self.several:
                lines += [f"## {self._number(s)}. {s.title}", ""]
            lines += [*s.report(config, res), ""]
        if figure_names:
            lines.append(f"Figures (PNG and PDF): {', '.join(figure_names)}.")
        return "\n".join(lines).rstrip("\n") + "\n"


def contract_functions(study: Study, module: str, **docs: str) -> tuple:
    """The study contract of ``study`` as the four functions of its module: ``run``,
    ``claims``, ``figures`` and ``report_markdown``, each calling the `Study` method of that
    name, documented with ``docs[name]`` (what is particular to the study) and
    `sharp_minima.studies.common.contract` (what every study shares).

    Args:
      study: the study.
      module: the module they belong to (its ``__name__``).
      **docs: a docstring for each of the four names.

    Returns:
      ``(run, claims, figures, report_markdown)``.

    Raises:
      ValueError: a docstring missing, or one for another name.
    """
    names = ("run", "claims", "figures", "report_markdown")
    if set(docs) != set(names):
        raise ValueError(f"contract_functions needs a docstring for each of {names}")

    def run(config, workdir: str, *, data=None, log=print, extend: bool = False) -> dict:
        return study.run(config, workdir, data=data, log=log, extend=extend)

    def claims(config, results: dict) -> list:
        return study.claims(config, results)

    def figures(config, results: dict) -> dict:
        return study.figures(config, results)

    def report_markdown(config, results: dict, figure_names=None) -> str:
        return study.report_markdown(config, results, figure_names)

    out = []
    for fn in (run, claims, figures, report_markdown):
        fn.__module__, fn.__qualname__, fn.__doc__ = module, fn.__name__, docs[fn.__name__]
        out.append(common.contract(fn))
    return tuple(out)
