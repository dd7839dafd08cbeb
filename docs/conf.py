"""Sphinx configuration of ncclep's user documentation (built by scripts/docs.sh)."""

from __future__ import annotations

import os
import sys

# the checkout's ncclep, also when it is not installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ncclep

project = "ncclep"
author = "the ncclep developers"
copyright = "the ncclep developers"
version = release = ncclep.__version__

extensions = [
    "myst_parser",  # the pages are Markdown (MyST)
    "sphinx.ext.autodoc",  # the Python API from its docstrings
    "sphinx.ext.napoleon",  # "Args:" sections in those docstrings
    "sphinx.ext.viewcode",  # links to the source of each documented object
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # links to sections: [text](page.md#a-heading)

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"ncclep {release}"
html_theme_options = {
    "description": "Expert-parallel MoE dispatch/combine on NCCL's Device API",
    "page_width": "1240px",  # room for the 100-column code blocks and the wide tables
    "sidebar_width": "240px",
}


# Napoleon reads a property's first line "text: more text" as "type: description". ncclep's
# properties have plain docstrings: keep them as written (saved before napoleon, restored after).
_plain: dict[str, list[str]] = {}


def _save_plain(app, what, name, obj, options, lines):
    if what in ("property", "attribute"):
        _plain[name] = list(lines)


def _restore_plain(app, what, name, obj, options, lines):
    if name in _plain:
        lines[:] = _plain.pop(name)


def setup(app):
    app.connect("autodoc-process-docstring", _save_plain, priority=100)
    app.connect("autodoc-process-docstring", _restore_plain, priority=900)
