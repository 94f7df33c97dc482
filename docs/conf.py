"""Sphinx configuration of the grain_optax documentation.

Builds offline: no intersphinx inventories, no remote images, a theme
installed from pip (``pip install -e ".[docs]"``). CI builds it with warnings
as errors and runs the guides' code with the doctest builder::

  sphinx-build -W --keep-going -b html docs docs/_build/html
  sphinx-build -W --keep-going -b doctest docs docs/_build/doctest
"""

import os
import pathlib
import re
import sys

from sphinx.util import logging

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The guides' code runs on the CPU (the exact solver's XLA form), compiled
# with the test suite's fast XLA CPU flags (probed first; the doctest step is
# bound by compile time, and the flags halve it).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(ROOT / 'tests'))
import _xla_flags  # noqa: E402  (tests/_xla_flags.py)

_xla_flags.use_fast_compile_flags()

import jax  # noqa: E402
import grain_optax  # noqa: E402  (after the path is set)
import grain_optax.testing  # noqa: E402

# The scaling-out guide runs GRAIN over 4 simulated CPU devices.
jax.config.update('jax_num_cpu_devices', 4)

project = 'grain_optax'
author = 'The grain_optax authors'
copyright = '2026, The grain_optax authors'  # noqa: A001  (Sphinx's name)
release = grain_optax.__version__
version = release

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.doctest',
    'sphinx.ext.extlinks',
    'sphinx.ext.mathjax',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]

# The project's repository (placeholder until the public address is
# confirmed): {src}`examples/quickstart.py` links to a file of it.
REPOSITORY = 'https://github.com/grain-optax/grain_optax'
extlinks = {'src': (REPOSITORY + '/blob/main/%s', '%s')}

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']
root_doc = 'index'

# MyST: $...$ and $$...$$ math, ::: fences, anchors for the headings (so
# pages link to sections as page.md#heading).
myst_enable_extensions = ['dollarmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3

# Docstrings are in Google style (napoleon); type hints shown in the
# signature, members in source order.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_default_options = {'show-inheritance': False}
autosummary_generate = False

# The doctest builder runs the guides' ``{testcode}`` blocks. The ``>>>``
# examples of the docstrings are run by pytest (--doctest-modules), so they
# are not run a second time here.
doctest_test_doctest_blocks = ''
doctest_global_setup = ''

html_theme = 'sphinx_book_theme'
html_title = f'grain_optax {release}'
html_theme_options = {
    'show_toc_level': 2,
    'use_download_button': False,
    'use_fullscreen_button': False,
}
html_static_path = []
html_last_updated_fmt = None

pygments_style = 'sphinx'

_logger = logging.getLogger('grain_optax.docs')


def _check_api_reference(app, env):
  """Warns (an error under -W) if a public name is not in the API reference.

  Every name in ``grain_optax.__all__`` and ``grain_optax.testing.__all__``
  must be documented as a Python object ``<module>.<name>`` somewhere in the
  docs (``docs/api.md``).
  """
  del app
  documented = set(env.get_domain('py').objects)
  for module in (grain_optax, grain_optax.testing):
    for name in module.__all__:
      if f'{module.__name__}.{name}' not in documented:
        _logger.warning(
            'public name %s.%s (in its __all__) is missing from the API '
            'reference: add it to docs/api.md', module.__name__, name)


_RELATIVE_LINK = re.compile(r'\]\((?!https?:|mailto:|#)([^)\s]+)\)')
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.svg', '.gif')


def _link_repository_files(app, relative_path, parent_docname, content):
  """Points an included file's links to repository files at the repository.

  ``benchmarks/RESULTS.md`` and ``STABILITY.md`` are included whole
  (``{include}``); their links to files and folders beside them (raw results)
  are not pages of the docs, so they become links to the repository. Images
  stay relative (copied into the build by ``:relative-images:``).
  """
  del parent_docname
  folder = (pathlib.Path(app.srcdir) / relative_path).resolve().parent
  try:
    folder = folder.relative_to(ROOT).as_posix()
  except ValueError:
    return

  def repository_link(match):
    target = match.group(1)
    if target.lower().endswith(_IMAGE_SUFFIXES):
      return match.group(0)
    return f']({REPOSITORY}/tree/main/{folder}/{target})'

  content[0] = _RELATIVE_LINK.sub(repository_link, content[0])


def setup(app):
  app.connect('env-check-consistency', _check_api_reference)
  app.connect('include-read', _link_repository_files)
