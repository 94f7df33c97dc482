"""Gram matrix and combination over pytrees of per-group updates."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grain_optax

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@st.composite
def per_group_trees(draw):
  m = draw(st.integers(1, 6))
  n_leaves = draw(st.integers(1, 4))
  dtype = draw(st.sampled_from(DTYPES))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  tree = {}
  for i in range(n_leaves):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    tree[f'leaf{i}'] = jnp.asarray(rng.normal(size=(m,) + shape), dtype)
  return tree, m


def flat64(tree, m):
  return np.concatenate(
      [np.asarray(x, np.float64).reshape(m, -1)
       for x in jax.tree_util.tree_leaves(tree)], axis=1)


@hypothesis.given(per_group_trees())
def test_gram_matches_float64(case):
  tree, m = case
  k = grain_optax.gram_matrix(tree)
  assert k.dtype == jnp.float32 and k.shape == (m, m)
  g = flat64(tree, m)
  expected = g @ g.T
  np.testing.assert_allclose(k, expected, rtol=1e-5, atol=1e-5)


@hypothesis.given(per_group_trees())
def test_combine_is_weighted_sum_in_leaf_dtype(case):
  tree, m = case
  w = np.random.default_rng(m).dirichlet(np.ones(m)).astype(np.float32)
  out = grain_optax.combine(tree, jnp.asarray(w))
  for name, leaf in tree.items():
    assert out[name].dtype == leaf.dtype
    assert out[name].shape == leaf.shape[1:]
    expected = np.tensordot(w.astype(np.float64), np.asarray(leaf, np.float64), 1)
    tol = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}[leaf.dtype.type]
    np.testing.assert_allclose(np.asarray(out[name], np.float64), expected,
                               rtol=tol, atol=tol)


def test_bf16_gram_accumulates_in_float32():
  # 4096 bf16 ones: a bf16 accumulator would stall at 256.
  g = jnp.ones((2, 4096), jnp.bfloat16)
  np.testing.assert_array_equal(grain_optax.gram_matrix(g), np.full((2, 2), 4096.0))


def test_combine_ignores_nan_in_zero_weight_groups():
  tree = {'w': jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf]])}
  out = grain_optax.combine(tree, jnp.array([1.0, 0.0]))
  np.testing.assert_array_equal(out['w'], [1.0, 2.0])


def test_mismatched_group_counts_name_the_leaves():
  tree = {'a': jnp.zeros((3, 2)), 'b': jnp.zeros((4, 2))}
  with pytest.raises(ValueError, match=r"\['b'\].*4 groups.*\['a'\].*3"):
    grain_optax.gram_matrix(tree)
  with pytest.raises(ValueError, match=r"\['b'\]"):
    grain_optax.combine(tree, jnp.ones(3) / 3)


def test_scalar_leaf_and_bad_weights():
  with pytest.raises(ValueError, match=r"\['s'\].*group axis"):
    grain_optax.gram_matrix({'s': jnp.float32(1.0)})
  with pytest.raises(ValueError, match=r'weights have shape \(2,\).*\(3,\)'):
    grain_optax.combine({'a': jnp.zeros((3, 2))}, jnp.ones(2))
