"""Splitting batches into groups and per-group value_and_grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grain_optax


@pytest.fixture(autouse=True)
def _float32_matmuls():
  # The comparisons below need float32 matmuls in the losses; GPUs default to
  # TF32 (about 1e-3 relative error), which the two routes round differently.
  with jax.default_matmul_precision('highest'):
    yield


def loss_fn(params, batch):
  pred = jnp.tanh(batch['x'] @ params['w'] + params['b'])
  return jnp.mean((pred - batch['y']) ** 2)


def make(seed=0, n=12):
  rng = np.random.default_rng(seed)
  params = {'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            'b': jnp.zeros(2)}
  batch = {'x': jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)}
  return params, batch


@pytest.mark.parametrize('num_groups', [1, 2, 3, 4, 12])
def test_per_group_gradients_match_manual(num_groups):
  params, batch = make()
  losses, grads = jax.jit(grain_optax.group_value_and_grad(loss_fn, num_groups))(
      params, batch)
  assert losses.shape == (num_groups,)
  size = 12 // num_groups
  for i in range(num_groups):
    part = jax.tree_util.tree_map(lambda x: x[i * size:(i + 1) * size], batch)
    loss_i, grad_i = jax.value_and_grad(loss_fn)(params, part)
    np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
    for k in grad_i:
      np.testing.assert_allclose(grads[k][i], grad_i[k], rtol=1e-5, atol=1e-6)
  # The mean of the group gradients is the full-batch gradient.
  full = jax.grad(loss_fn)(params, batch)
  for k in full:
    np.testing.assert_allclose(grads[k].mean(0), full[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('chunk_size', [1, 2, 3])
def test_chunked_groups_match_vmap(chunk_size):
  params, batch = make(1)
  ref = grain_optax.group_value_and_grad(loss_fn, 4)(params, batch)
  out = jax.jit(grain_optax.group_value_and_grad(loss_fn, 4, chunk_size=chunk_size))(
      params, batch)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, ref)


def test_has_aux_and_extra_args():
  def loss_aux(params, batch, scale):
    loss = scale * loss_fn(params, batch)
    return loss, {'n': batch['x'].shape[0]}

  params, batch = make(2)
  (losses, aux), grads = grain_optax.group_value_and_grad(
      loss_aux, 3, has_aux=True)(params, batch, 2.0)
  assert losses.shape == (3,) and aux['n'].shape == (3,)
  np.testing.assert_array_equal(aux['n'], [4, 4, 4])
  assert grads['w'].shape == (3, 3, 2)


def test_split_errors_name_the_leaf():
  params, batch = make(n=10)
  with pytest.raises(ValueError, match=r"\['x'\].*batch size 10.*num_groups=4"):
    grain_optax.group_value_and_grad(loss_fn, 4)(params, batch)
  with pytest.raises(ValueError, match='num_groups must be an int >= 1'):
    grain_optax.group_value_and_grad(loss_fn, 0)
  with pytest.raises(ValueError, match='chunk_size'):
    grain_optax.group_value_and_grad(loss_fn, 2, chunk_size=0)
  with pytest.raises(ValueError, match='scalar'):
    grain_optax.split_into_groups({'x': jnp.float32(1.0)}, 2)
  with pytest.raises(ValueError, match='batch_argnums'):
    grain_optax.group_value_and_grad(loss_fn, 2, batch_argnums=0)
