"""Sphinx configuration of the API reference: ``python -m sphinx -W -b html docs docs/_build``."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "sharp_minima"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style Args / Returns / Raises
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say what each argument is
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]
html_theme = "alabaster"
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each field


def _absolute_values(app, what, name, obj, options, lines):
    """Docstrings write |x| for absolute values and norms, never reST substitutions."""
    lines[:] = [line.replace("|", r"\|") for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _absolute_values)
