"""Sphinx configuration: the Markdown pages through MyST, the reference from the docstrings.

Build with ``sphinx-build docs docs/_build/html`` from the repository root.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

# Build from a source tree without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dstmtl

project = "dstmtl"
author = "dstmtl developers"
copyright = "dstmtl developers"
release = dstmtl.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

# $x$ and $$x$$ in the Markdown pages; links to headings such as howto.md#a-write-your-own-metric.
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
    # nn.Module's hook for its repr, which would bring torch's docstring along.
    "exclude-members": "extra_repr",
}

# Every cross-reference must resolve. Without network access there is no intersphinx, so
# names from torch, torchvision and the standard library stay plain text.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:\w+",
        r"(torch|torchvision|lightning|transformers|os|pathlib|collections\.abc|typing|abc)(\..*)?",
    ),
    # The string annotation of dstmtl.study.harness.Data, which Sphinx cannot resolve.
    (r"py:class", r"Dataset\[Any\]"),
    # Private type variables of generic signatures (Processes.on_first's result).
    (r"py:class", r"dstmtl\..*\._T"),
]

html_theme = "furo"
html_title = f"dstmtl {release}"

logger = logging.getLogger(__name__)


def _check_every_public_name(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (an error under -W) for a name in a documented module's __all__ left out.

    A name counts as documented under any module, so a class re-exported from the package
    root needs one entry, on the root's page.
    """
    python = env.get_domain("py")
    documented = {
        name.rpartition(".")[2]
        for name, _, objtype, *_ in python.get_objects()
        if objtype in ("class", "exception", "function", "data")
    }
    for module_name, *_ in (entry for entry in python.get_objects() if entry[2] == "module"):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if isinstance(getattr(module, name), ModuleType):
                continue  # a submodule has its own page
            if name not in documented:
                logger.warning(
                    "%s.%s is public (in __all__) but not in the API reference; add it to the "
                    "page of %s under docs/reference/",
                    module_name,
                    name,
                    module_name,
                )


def setup(app: Sphinx) -> None:
    app.connect("env-check-consistency", _check_every_public_name)
