"""Splitting batches into groups and per-group value_and_grad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# ---------------------------------------------------------------------------
# grad_dtype: per-group gradients in the dtype the backward pass produces.


def _mixed_params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {'w': f(4, 3), 'b': f(3), 'tied': f(4, 3), 'inner': f(3, 3),
          'stack': f(2, 3, 3), 'shared': f(3, 3)}


def _mixed_loss(params, batch):
  bf = jnp.bfloat16
  x = batch['x'].astype(bf)
  # One cast: narrowed. b is used in float32 arithmetic: kept.
  h = (x @ params['w'].astype(bf)).astype(jnp.float32) + params['b']
  # Two casts of the same leaf (a tied weight): kept.
  h = h + (x @ params['tied'].astype(bf)).astype(jnp.float32)
  h = h * jnp.mean(params['tied'].astype(bf)).astype(jnp.float32)
  # One cast inside jax.jit and jax.checkpoint: narrowed.
  inner = jax.jit(jax.checkpoint(lambda w, h: h.astype(bf) @ w.astype(bf)))
  h = inner(params['inner'], h).astype(jnp.float32)

  # Scanned over (xs): narrowed; closed over by the scan (a const): kept.
  def body(h, w):
    h = (h.astype(bf) @ w.astype(bf)) @ params['shared'].astype(bf)
    return jnp.tanh(h.astype(jnp.float32)), None

  h, _ = jax.lax.scan(body, h, params['stack'])
  return jnp.mean((h - batch['y']) ** 2)


def _mixed_batch():
  rng = np.random.default_rng(1)
  return {'x': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
          'y': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}


def test_backward_dtype_narrows_exactly_the_single_cast_leaves():
  params, batch = _mixed_params(), _mixed_batch()
  losses, grads = jax.jit(grain_optax.group_value_and_grad(_mixed_loss, 4))(
      params, batch)
  ref_losses, ref = jax.jit(grain_optax.group_value_and_grad(
      _mixed_loss, 4, grad_dtype='params'))(params, batch)
  narrowed = {k for k, g in grads.items() if g.dtype == jnp.bfloat16}
  assert narrowed == {'w', 'inner', 'stack'}, narrowed
  assert all(g.dtype == jnp.float32 for k, g in grads.items()
             if k not in narrowed)
  assert all(g.dtype == jnp.float32 for g in ref.values())
  np.testing.assert_array_equal(losses, ref_losses)
  for k in grads:
    # The float32 gradient is the cast of the narrow one: the same numbers
    # (on the CPU bit for bit; other backends may fuse the cast).
    exact = jax.default_backend() == 'cpu'
    np.testing.assert_allclose(
        np.asarray(grads[k], np.float32), np.asarray(ref[k]),
        rtol=0 if exact else 2 ** -7, atol=0 if exact else 1e-6, err_msg=k)


def test_backward_dtype_gives_grain_the_float32_update():
  params, batch = _mixed_params(), _mixed_batch()
  tx = optax.chain(grain_optax.grain(num_groups=4), optax.adamw(1e-2))

  def step(params, state, grad_dtype):
    _, grads = grain_optax.group_value_and_grad(
        _mixed_loss, 4, grad_dtype=grad_dtype)(params, batch)
    return tx.update(grads, state, params)

  step = jax.jit(step, static_argnums=2)
  updates, state = step(params, tx.init(params), 'backward')
  ref_updates, ref_state = step(params, tx.init(params), 'params')
  for k in params:
    assert updates[k].dtype == jnp.float32, k
    np.testing.assert_allclose(updates[k], ref_updates[k], rtol=1e-5,
                               atol=1e-7, err_msg=k)
  np.testing.assert_allclose(state[0].weights, ref_state[0].weights,
                             atol=1e-6)
  # The lean mode's first pass takes the same narrow gradients.
  lean = jax.jit(grain_optax.grain_value_and_grad(_mixed_loss, 4))(
      params, batch)
  np.testing.assert_allclose(lean.weights, ref_state[0].weights, atol=1e-6)
  assert all(g.dtype == jnp.float32 for g in lean.grads.values())


def test_bad_grad_dtype_is_rejected():
  with pytest.raises(ValueError, match="grad_dtype='bfloat16'"):
    grain_optax.group_value_and_grad(_mixed_loss, 4, grad_dtype='bfloat16')


# The narrowing never changes what the loss computes (issue 26, N1): losses
# that read a parameter's dtype, branch on it, or return it in aux.


def _reads_dtype_loss(params, batch, aux=True):
  bf = jnp.bfloat16
  w = params['w']
  logits = (batch['x'].astype(bf) @ w.astype(bf)).astype(w.dtype)
  # A dtype-dependent constant and branch: float32 gives the larger bias.
  logits = logits + (1.0 if w.dtype == jnp.float32 else 0.0)
  logits = logits * jnp.finfo(w.dtype).eps / jnp.finfo(jnp.float32).eps
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']).mean()
  if not aux:
    return loss
  return loss, {'w': w}


def _reads_dtype_setup():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)
  params = {'w': w.at[0, 0].set(1.0009765625)}   # not a bfloat16 number
  batch = {'x': jnp.asarray(rng.normal(size=(64, 16)) * 3, jnp.float32),
           'y': jnp.asarray(rng.integers(0, 10, 64))}
  return params, batch


@pytest.mark.parametrize('with_aux', [False, True])
def test_backward_dtype_keeps_losses_that_read_the_dtype(with_aux):
  params, batch = _reads_dtype_setup()
  loss = (_reads_dtype_loss if with_aux
          else lambda p, b: _reads_dtype_loss(p, b, aux=False))
  fn = lambda gd: jax.jit(grain_optax.group_value_and_grad(
      loss, 4, has_aux=with_aux, grad_dtype=gd))(params, batch)
  out, grads = fn('backward')
  ref_out, ref = fn('params')
  losses, ref_losses = ((out[0], ref_out[0]) if with_aux else (out, ref_out))
  assert losses.dtype == jnp.float32
  np.testing.assert_array_equal(losses, ref_losses)
  if with_aux:
    # The parameter returned in aux keeps its value (and so is not narrowed).
    aux, ref_aux = out[1], ref_out[1]
    assert aux['w'].dtype == jnp.float32 and grads['w'].dtype == jnp.float32
    np.testing.assert_array_equal(aux['w'][:, 0, 0], np.full(4, 1.0009765625))
    np.testing.assert_array_equal(aux['w'], ref_aux['w'])
  else:
    assert grads['w'].dtype == jnp.bfloat16
  exact = jax.default_backend() == 'cpu'
  np.testing.assert_allclose(
      np.asarray(grads['w'], np.float32), np.asarray(ref['w']),
      rtol=0 if exact else 2 ** -7, atol=0 if exact else 1e-6)


def test_backward_dtype_keeps_the_lean_mode_losses():
  params, batch = _reads_dtype_setup()
  loss = lambda p, b: _reads_dtype_loss(p, b, aux=False)
  out = jax.jit(grain_optax.grain_value_and_grad(loss, 4))(params, batch)
  ref = jax.jit(grain_optax.grain_value_and_grad(
      loss, 4, grad_dtype='params'))(params, batch)
  np.testing.assert_array_equal(out.losses, ref.losses)
  np.testing.assert_allclose(out.weights, ref.weights, atol=1e-6)
  np.testing.assert_allclose(out.grads['w'], ref.grads['w'], rtol=1e-5,
                             atol=1e-7)


def test_a_failing_dtype_analysis_keeps_the_params_dtypes(monkeypatch):
  # A JAX release that changes the jaxpr the analysis reads must not break
  # training: no leaf is narrowed, with a warning naming the error.
  from grain_optax._src import backward_dtype  # pylint: disable=g-import-not-at-top

  def broken(*args, **kwargs):
    raise KeyError('jaxpr')

  monkeypatch.setattr(backward_dtype, '_narrow_dtype', broken)
  params, batch = _mixed_params(), _mixed_batch()
  with pytest.warns(RuntimeWarning, match="grad_dtype='backward'.*KeyError"):
    losses, grads = grain_optax.group_value_and_grad(_mixed_loss, 4)(
        params, batch)
  assert all(g.dtype == jnp.float32 for g in grads.values())
  ref_losses, _ = grain_optax.group_value_and_grad(
      _mixed_loss, 4, grad_dtype='params')(params, batch)
  np.testing.assert_array_equal(losses, ref_losses)
