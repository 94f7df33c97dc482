"""Property asserts and helpers shared by the tests.

The properties every aggregation of group gradients promises, asserted the
same way in every test file: convex weights on the simplex, and an update
that conflicts with no group (GRAIN's guarantee <d, g_i> >= ||d||^2).
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def assert_simplex(w, atol=1e-6):
  """``w`` is non-negative and sums to 1 (to ``atol``)."""
  w = np.asarray(w, np.float64)
  assert np.all(w >= 0), w
  np.testing.assert_allclose(w.sum(), 1.0, atol=atol)


def assert_non_conflicting(groups, d, *, atol=0.0, rtol=0.0):
  """<d, g_i> >= ||d||^2 for every row g_i of ``groups`` ([m, P]).

  The slack is ``atol + rtol * max_i ||g_i||^2``.
  """
  g = np.asarray(groups)
  d = np.asarray(d)
  scale = np.max(np.sum(g ** 2, 1)) if rtol else 0.0
  assert np.all(g @ d >= d @ d - atol - rtol * scale), (g @ d, d @ d)


def params_like(per_group):
  """Zero params shaped like one group of a per-group tree."""
  return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:], x.dtype),
                                per_group)


def load_example(name):
  """Imports ``examples/<name>.py`` as a module."""
  if str(EXAMPLES) not in sys.path:  # Some examples import their siblings.
    sys.path.insert(0, str(EXAMPLES))
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
