"""Sphinx configuration of the documentation: ``python -m sphinx -W -b html docs docs/_build``.

Three parts: the user guide (``guide/``, one page per topic; its code blocks run in
``tests/test_guide.py``), the notebooks (copied here from ``experiments/notebooks`` and
rendered from their stored outputs by myst-nb, never executed) and the API reference (autodoc
over the public modules, Google-style docstrings via napoleon).
"""

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

project = "sharp_minima"
extensions = [
    "sphinx.ext.autodoc",
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


copy_notebooks()


def _absolute_values(app, what, name, obj, options, lines):
    """Docstrings write |x| for absolute values and norms, never reST substitutions."""
    lines[:] = [line.replace("|", r"\|") for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _absolute_values)
