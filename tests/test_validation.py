"""Input checks: what is accepted like plain optax, and what fails clearly."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grain_optax


def test_complex_leaves_are_rejected_naming_the_leaf():
  g = {'a': jnp.ones((2, 3)), 'z': jnp.ones((2, 3)) * (1 + 1j)}
  tx = grain_optax.grain()
  with pytest.raises(ValueError, match=r"\['z'\].*complex.*\(2, 3\)"):
    jax.eval_shape(tx.update, g, tx.init(None))
  with pytest.raises(ValueError, match=r"\['z'\].*complex"):
    grain_optax.gram_matrix(g)
  with pytest.raises(ValueError, match=r"\['z'\].*complex"):
    grain_optax.combine(g, jnp.array([0.5, 0.5]))


def test_python_float_param_is_accepted_as_in_plain_optax():
  params = {'scale': 1.0, 'w': jnp.zeros(2)}
  tx = optax.chain(grain_optax.grain(), optax.sgd(0.5))
  g = {'scale': jnp.array([2.0, 4.0]), 'w': jnp.array([[1., 0.], [0., 1.]])}
  updates, _ = jax.eval_shape(tx.update, g, tx.init(params), params)
  assert updates['scale'].shape == () and updates['w'].shape == (2,)


def _loss(w, x, y):
  return jnp.mean((x @ w - y) ** 2)


def test_batch_argnums_tuple_splits_every_batch_argument():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  losses, grads = grain_optax.group_value_and_grad(
      _loss, 4, batch_argnums=(1, 2))(w, x, y)
  ref_losses, ref_grads = grain_optax.group_value_and_grad(
      lambda w, b: _loss(w, b['x'], b['y']), 4)(w, {'x': x, 'y': y})
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  np.testing.assert_allclose(grads, ref_grads, rtol=1e-6)
  # The lean mode: its second pass also splits both arguments.
  out = grain_optax.grain_value_and_grad(_loss, 4, batch_argnums=(1, 2))(w, x, y)
  np.testing.assert_allclose(out.losses, ref_losses, rtol=1e-6)
  np.testing.assert_allclose(out.grads, out.weights @ ref_grads, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match='batch_argnums'):
    grain_optax.group_value_and_grad(_loss, 2, batch_argnums=(1, 0))
  with pytest.raises(ValueError, match='batch_argnums'):
    grain_optax.group_value_and_grad(_loss, 2, batch_argnums=(1, 1))


def test_numpy_integers_are_accepted_and_bools_rejected():
  g = {'w': jnp.arange(8.0).reshape(4, 2)}
  tx = grain_optax.grain(num_groups=np.int64(4))
  d, state = jax.eval_shape(tx.update, g, tx.init(None))
  assert d['w'].shape == (2,) and state.weights.shape == (4,)
  with pytest.raises(ValueError, match=r'3 groups.*num_groups=4'):
    jax.eval_shape(tx.update, {'w': jnp.ones((3, 2))}, tx.init(None))
  assert grain_optax.split_into_groups(
      {'x': jnp.arange(6)}, np.int32(3))['x'].shape == (3, 2)
  assert grain_optax.group_value_and_grad(
      lambda w, x: jnp.sum(w * x), np.int64(2))(1.0, jnp.ones(4))[0].shape == (2,)
  params = {'w': jnp.zeros(2)}
  tx = grain_optax.accumulate(optax.sgd(1.0), every_k=np.int64(2))
  state = tx.init(params)
  assert state.stats.weights.shape == (2,) and state.buffer['w'].shape == (2, 2)
  _, state = jax.eval_shape(tx.update, {'w': jnp.ones(2)}, state, params)
  assert state.buffer['w'].shape == (2, 2)
  for bad in (True, np.True_, 4.0, 0):
    with pytest.raises(ValueError, match='num_groups must be'):
      grain_optax.grain(num_groups=bad)
    with pytest.raises(ValueError, match='num_groups must be'):
      grain_optax.group_value_and_grad(_loss, bad)
  with pytest.raises(ValueError, match='every_k must be an int'):
    grain_optax.accumulate(optax.sgd(1.0), every_k=True)
  with pytest.raises(ValueError, match='max_every_k must be an int'):
    grain_optax.accumulate(optax.sgd(1.0), every_k=lambda s: 2,
                           max_every_k=True)


def test_nnx_without_flax_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'flax', None)
  with pytest.raises(ImportError, match=r'pip install grain_optax\[flax\]'):
    grain_optax.nnx_group_value_and_grad(lambda m, b: 0.0, 2)
