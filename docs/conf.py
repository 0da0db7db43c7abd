"""Sphinx configuration of the documentation: ``python -m sphinx -W -b html docs docs/_build``.

Three parts: the user guide (the README, one page per ``##`` section, generated here at every
build so it never drifts from the README), the notebooks (copied here from
``experiments/notebooks`` and rendered from their stored outputs by myst-nb, never executed)
and the API reference (autodoc over the public modules, Google-style docstrings via napoleon).
"""

import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

project = "sharp_minima"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style Args / Returns / Raises
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown pages (MyST) and notebooks
]
exclude_patterns = ["_build"]
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say what each argument is
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each field
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]
nb_execution_mode = "off"  # notebooks show the outputs of their committed CPU run
nb_render_markdown_format = "myst"  # the claims tables in the outputs (commonmark has none)
html_theme = "alabaster"


def _slug(heading: str) -> str:
    """The anchor MyST (and GitHub) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _repository() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^Repository = "(.+)"$', f.read(), re.M).group(1)


def write_guide() -> list[str]:
    """``guide/NN-<slug>.md`` for every ``##`` section of the README (the text before the
    first is the guide's opening page). Links are made to work from ``docs/guide/``: README
    figures under ``docs/`` become relative, links to the README's own headings point at the
    page that holds them, and other repository files become links to the repository."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    parts = re.split(r"^(?=## )", readme, flags=re.M)
    intro, sections = parts[0], parts[1:]
    short = lambda slug: slug if len(slug) <= 40 else slug[:40].rsplit("-", 1)[0]  # noqa: E731
    names = ["00-introduction"]
    names += [f"{i:02d}-{short(_slug(s.splitlines()[0][3:]))}" for i, s in enumerate(sections, 1)]
    texts = ["# Introduction\n" + intro.split("\n", 1)[1]] + ["#" + s[2:] for s in sections]
    where = {}  # anchor -> page
    for name, text in zip(names, texts):
        for heading in re.findall(r"^#+ (.+)$", text, re.M):
            where.setdefault(_slug(heading), name)
    repo = _repository()

    def link(match, page):
        target = match.group(1)
        if target.startswith(("http://", "https://", "mailto:")):
            return match.group(0)
        if target.startswith("#"):
            other = where.get(target[1:], page)
            return f"]({other}.md{target})" if other != page else match.group(0)
        if target.startswith("docs/"):
            return f"](../{target[len('docs/') :]})"
        return f"]({repo}/blob/main/{target})"

    folder = os.path.join(HERE, "guide")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name, text in zip(names, texts):
        text = re.sub(r"\]\(([^)\s]+)\)", lambda m, p=name: link(m, p), text)
        with open(os.path.join(folder, f"{name}.md"), "w") as f:
            f.write(text)
    return names


def copy_notebooks() -> list[str]:
    """The committed notebooks, copied into ``notebooks/`` (Sphinx reads only its source
    folder); rendered from their stored outputs."""
    src = os.path.join(ROOT, "experiments", "notebooks")
    folder = os.path.join(HERE, "notebooks")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    names = sorted(f for f in os.listdir(src) if f.endswith(".ipynb"))
    for name in names:
        shutil.copy(os.path.join(src, name), folder)
    return names


write_guide()
copy_notebooks()


def _absolute_values(app, what, name, obj, options, lines):
    """Docstrings write |x| for absolute values and norms, never reST substitutions."""
    lines[:] = [line.replace("|", r"\|") for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _absolute_values)
