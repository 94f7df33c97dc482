"""Test configuration: import path and hypothesis profiles.

Profiles (``pytest --hypothesis-profile=NAME``):

* ``ci`` (default): derandomized, 30 examples per property. With the
  hypothesis version pinned in ``pyproject.toml``'s ``[test]`` extra, every
  run draws the same cases, so CI cannot turn red on its own; the cases that
  once failed are pinned with ``@hypothesis.example`` in the tests.
* ``thorough``: 500 random examples per property, a fresh draw each run.
  Run it before closing work on the solvers or the transforms:
  ``python -m pytest -q -n 2 --hypothesis-profile=thorough tests/test_solvers.py
  tests/test_gram_combine.py`` (about 15 minutes on 2 cores).
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# Subprocesses that run a script by path (tests/_resumable_training.py,
# tests/test_x64.py) import the grain_optax this process imports, installed
# or not: its parent folder goes first on their PYTHONPATH.
_spec = importlib.util.find_spec('grain_optax')
if _spec is not None and _spec.origin:
  os.environ['PYTHONPATH'] = os.pathsep.join(
      p for p in (os.path.dirname(os.path.dirname(_spec.origin)),
                  os.environ.get('PYTHONPATH')) if p)

# On GPUs, several pytest-xdist workers share a device: allocate on demand
# instead of each reserving 75% of its memory.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# Fast-compiling XLA flags for the CPU (see tests/_xla_flags.py).
_xla_flags.use_fast_compile_flags()

import hypothesis  # pylint: disable=g-import-not-at-top

hypothesis.settings.register_profile(
    'ci', deadline=None, max_examples=30, derandomize=True,
    database=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    'thorough', deadline=None, max_examples=500, derandomize=False,
    database=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile('ci')


import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(autouse=True)
def _float32_matmuls():
  """Tests compare numbers at float32 precision; GPUs default to TF32."""
  with jax.default_matmul_precision('highest'):
    yield


def pytest_report_header(config):
  del config  # Unused.
  return [f'XLA_FLAGS: {os.environ.get("XLA_FLAGS", "")!r}']
