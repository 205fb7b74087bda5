"""Sphinx extension: serve MathJax 3 from the book's own ``_static`` folder.

Sphinx's ``sphinx.ext.mathjax`` loads MathJax from a CDN, so a book opened without a network shows
its equations as raw TeX (``\\(256 \\times 256\\)``). This extension copies MathJax 3's browser
bundle (the ``es5`` folder of npm's ``mathjax@3.2.2``, shipped inside the pip package
``sphinx-mathjax-offline``) into ``_static/mathjax`` of the HTML output and points
``mathjax_path`` at ``mathjax/tex-mml-chtml.js``, the same bundle Sphinx takes from the CDN. The
``mathjax3_config`` that myst-nb sets still applies; MathJax finds its fonts and TeX extensions
relative to the script, so nothing is fetched from outside the book.

Jupyter Book loads it through ``_config.yml``::

    sphinx:
      local_extensions:
        offline_mathjax: tools
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError
from sphinx.ext.mathjax import MATHJAX_URL
from sphinx.util import logging
from sphinx.util.fileutil import copy_asset

logger = logging.getLogger(__name__)

DISTRIBUTION = "sphinx-mathjax-offline"  # the pip package that ships MathJax's files
ENTRY_POINT = "tex-mml-chtml.js"  # TeX and MathML input, CommonHTML output (Sphinx's default)
STATIC_SUBDIR = "mathjax"  # where the files go under the output's _static folder


def mathjax_source_dir() -> Path:
    """Return the installed folder holding MathJax's ``es5`` files, or raise a clear error."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ExtensionError(
            f"offline_mathjax: the pip package {DISTRIBUTION!r} is not installed; "
            f"install the book extra (pip install -e '.[book]') or pip install {DISTRIBUTION}"
        ) from exc
    source = Path(str(dist.locate_file(f"{DISTRIBUTION}/static/mathjax")))
    if not (source / ENTRY_POINT).is_file():
        raise ExtensionError(
            f"offline_mathjax: {source / ENTRY_POINT} is missing; "
            f"reinstall {DISTRIBUTION} {dist.version}"
        )
    return source


def _use_local_mathjax(app: Sphinx, config: Config) -> None:
    """Point ``mathjax_path`` at the local copy unless the book chose another script itself."""
    mathjax_source_dir()  # fail at start-up, not after the build, when the files are missing
    if config.mathjax_path in (MATHJAX_URL, "", None):
        config.mathjax_path = f"{STATIC_SUBDIR}/{ENTRY_POINT}"
    elif "://" in config.mathjax_path:
        logger.warning(
            "offline_mathjax: mathjax_path is set to %s, so the book needs a network to show math",
            config.mathjax_path,
        )


def _copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    """Copy MathJax into ``<outdir>/_static/mathjax`` after an HTML build (unchanged files stay)."""
    if exception is not None or app.builder.format != "html":
        return
    copy_asset(mathjax_source_dir(), Path(app.outdir, "_static", STATIC_SUBDIR))


def setup(app: Sphinx) -> dict[str, object]:
    """Register the hooks; Sphinx calls this when the extension is loaded."""
    app.setup_extension("sphinx.ext.mathjax")
    app.connect("config-inited", _use_local_mathjax)
    app.connect("build-finished", _copy_mathjax)
    return {
        "version": "1.0",
        "parallel_read_safe": True,
        "parallel_write_safe": True,
    }
