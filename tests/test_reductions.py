"""Two-stage per-group sums (``split_sums`` of group_value_and_grad)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grain_optax
from grain_optax._src import reductions

# Large enough that each group's bias sum is split: 4 groups x 1024 rows.
N, D_IN, D_OUT, M = 4096, 32, 96, 4


def _data(dtype=jnp.float32):
  kx, ky, kw, kb = jax.random.split(jax.random.key(0), 4)
  params = {'w': 0.1 * jax.random.normal(kw, (D_IN, D_OUT)),
            'b': 0.1 * jax.random.normal(kb, (D_OUT,))}
  batch = {'x': jax.random.normal(kx, (N, D_IN)).astype(dtype),
           'y': jax.random.normal(ky, (N, D_OUT)).astype(dtype)}
  return params, batch


def _dense_loss(params, batch, dtype=jnp.float32):
  """A dense layer with a bias in ``dtype``; the bias gradient is a sum."""
  w, b = params['w'].astype(dtype), params['b'].astype(dtype)
  out = batch['x'] @ w + b
  return jnp.mean(jnp.square(out.astype(jnp.float32) - batch['y']))


def _barriers(fun, *args):
  return str(jax.make_jaxpr(fun)(*args)).count('optimization_barrier')


def test_split_sum_equals_one_stage_sum_and_applies():
  x = jax.random.normal(jax.random.key(1), (8, 256, 128), jnp.float32)
  fun = lambda x: (jnp.sum(x, axis=(0, 1)), jnp.sum(x, axis=2))
  split = reductions.split_leading_sums(fun)
  np.testing.assert_allclose(split(x)[0], fun(x)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(split(x)[1], fun(x)[1])
  # The leading sum is split; the sum over the last axis (a row sum) is not.
  assert _barriers(split, x) == 1
  assert _barriers(fun, x) == 0


@pytest.mark.parametrize('shape,axes', [
    ((512, 128), (0,)),        # too few elements per kept value
    ((4096, 8), (0,)),         # too few kept values
    ((4096, 128), (1,)),       # not a leading axis
    ((4096, 128), (0, 1)),     # nothing kept
])
def test_small_or_other_sums_are_left_alone(shape, axes):
  x = jnp.ones(shape)
  fun = lambda x: jnp.sum(x, axis=axes)
  assert _barriers(reductions.split_leading_sums(fun), x) == 0


def test_integer_sums_are_left_alone():
  x = jnp.ones((4096, 128), jnp.int32)
  fun = lambda x: jnp.sum(x, axis=0)
  split = reductions.split_leading_sums(fun)
  assert _barriers(split, x) == 0
  np.testing.assert_array_equal(split(x), fun(x))


def test_bf16_sum_is_accumulated_in_float32():
  # 4096 ones plus one small value each: a bf16 running sum would lose them.
  x = jnp.full((4096, 128), 1.0, jnp.bfloat16)
  x = x.at[:, 0].set(jnp.bfloat16(1.0 + 2 ** -7))
  exact = np.sum(np.asarray(x, np.float64), axis=0)
  got = reductions.split_leading_sums(
      lambda x: jax.lax.reduce_sum_p.bind(x, axes=(0,), out_sharding=None))(x)
  assert got.dtype == jnp.bfloat16
  # Within half a bf16 ulp of the exact sum: one rounding, at the end.
  ulp = np.spacing(np.float32(exact), dtype=np.float32) * 2 ** 16
  assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= ulp)


def test_nested_jit_and_checkpoint_are_split_custom_vjp_scan_run_unchanged():
  @jax.custom_vjp
  def double(x):
    return 2 * x

  double.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))

  @jax.jit
  def inner(x):
    return jnp.sum(x, axis=0)

  def fun(x):
    a = inner(x)
    b = jax.checkpoint(lambda x: jnp.sum(jnp.sin(x), axis=0))(x)
    c = jax.lax.scan(lambda c, r: (c + r, None), jnp.zeros(x.shape[1]), x)[0]
    return a + b + c + double(x[0])

  x = jax.random.normal(jax.random.key(2), (2048, 64))
  split = reductions.split_leading_sums(fun)
  np.testing.assert_allclose(split(x), fun(x), rtol=2e-5, atol=2e-4)
  np.testing.assert_allclose(jax.jit(split)(x), fun(x), rtol=2e-5, atol=2e-4)
  # The nested jit's and the checkpoint's sums; the scan's body has none.
  assert _barriers(split, x) == 2


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_group_gradients_with_and_without_split_sums_agree(dtype):
  params, batch = _data(dtype)
  loss = functools.partial(_dense_loss, dtype=dtype)
  groups = grain_optax.split_into_groups(batch, M)
  l1, g1 = jax.jit(grain_optax.group_value_and_grad(
      loss, M, split_sums=True))(params, batch)
  l0, g0 = jax.jit(grain_optax.group_value_and_grad(
      loss, M, split_sums=False))(params, batch)
  np.testing.assert_array_equal(l1, l0)
  if dtype == jnp.float32:
    # Per group, the bias gradient against a float64 sum of the cotangents.
    for i in range(M):
      out = groups['x'][i] @ params['w'] + params['b']
      dout = np.asarray(2 * (out - groups['y'][i]) / out.size, np.float64)
      np.testing.assert_allclose(np.asarray(g1['b'][i], np.float64),
                                 dout.sum(axis=0), rtol=1e-5, atol=1e-9)
  # GRAIN's weights from the two-stage gradients solve the one-stage Gram.
  w1 = grain_optax.min_norm_weights(grain_optax.gram_matrix(g1)).weights
  assert float(grain_optax.kkt_residual(grain_optax.gram_matrix(g0), w1)) < 1e-3
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -6
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), atol=tol * scale)


def test_split_sums_is_used_for_groups_and_off_on_request():
  params, batch = _data()
  on = grain_optax.group_value_and_grad(_dense_loss, M, split_sums=True)
  off = grain_optax.group_value_and_grad(_dense_loss, M, split_sums=False)
  one = grain_optax.group_value_and_grad(_dense_loss, 1, split_sums=True)
  assert _barriers(on, params, batch) >= 1
  assert _barriers(off, params, batch) == 0
  assert _barriers(one, params, batch) == 0  # one group: a plain backward


def test_split_sums_auto_is_on_where_the_step_is_traced_for_a_gpu(
    monkeypatch):
  params, batch = _data()
  auto = grain_optax.group_value_and_grad(_dense_loss, M)  # 'auto'
  on_gpu = jax.default_backend() == 'gpu'
  assert (_barriers(auto, params, batch) >= 1) == on_gpu
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert reductions.use_split_sums('auto')
  auto = grain_optax.group_value_and_grad(_dense_loss, M)  # traced anew
  assert _barriers(auto, params, batch) >= 1
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert not reductions.use_split_sums('auto')
  assert reductions.use_split_sums(True)
  assert not reductions.use_split_sums(False)
  with pytest.raises(ValueError, match="split_sums='yes'"):
    jax.eval_shape(grain_optax.group_value_and_grad(
        _dense_loss, M, split_sums='yes'), params, batch)


def test_layers_scanned_over_have_their_sums_split():
  # Biases of layers under lax.scan (and jax.checkpoint): their per-group
  # gradients are sums inside the backward scan's body.
  def layer(h, w):
    return jnp.tanh(h @ w['k'] + w['b'])

  def loss(params, batch):
    body = lambda h, w: (jax.checkpoint(layer)(h, w), None)
    h, _ = jax.lax.scan(body, batch['x'], params)
    return jnp.mean(jnp.square(h - batch['y']))

  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  params = {'k': 0.2 * jax.random.normal(k1, (3, 64, 64)),
            'b': 0.1 * jax.random.normal(k2, (3, 64))}
  batch = {'x': jax.random.normal(k3, (N, 64)), 'y': jnp.zeros((N, 64))}
  on = grain_optax.group_value_and_grad(loss, M, split_sums=True)
  off = grain_optax.group_value_and_grad(loss, M, split_sums=False)
  assert _barriers(on, params, batch) >= 1
  (l1, g1), (l0, g0) = jax.jit(on)(params, batch), jax.jit(off)(params, batch)
  np.testing.assert_array_equal(l1, l0)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-8)
  close(g1['b'], g0['b'])
  close(g1['k'], g0['k'])


def test_a_failing_rewrite_falls_back_to_the_traced_function(monkeypatch):
  # A JAX release that changes what the rewrite reads must not break
  # training: the function runs as traced, with a warning naming the error.
  from grain_optax._src import reductions  # pylint: disable=g-import-not-at-top

  def broken(*args, **kwargs):
    raise AttributeError('no such jaxpr field')

  monkeypatch.setattr(reductions, '_eval', broken)
  x = jnp.arange(4096.0).reshape(64, 64)
  fn = lambda x: jnp.sum(x, axis=0)
  with pytest.warns(RuntimeWarning, match='split_sums.*no such jaxpr field'):
    out = reductions.split_leading_sums(fn)(x)
  np.testing.assert_array_equal(out, fn(x))


def test_one_table_of_calls_classifies_real_jaxprs():
  # reductions and backward_dtype read one table of call primitives: the
  # calls JAX emits today must be in it, with their kinds.
  from grain_optax._src import jaxpr_calls  # pylint: disable=g-import-not-at-top

  def f(x):
    y = jax.jit(lambda x: x * 2)(x)
    y = jax.checkpoint(lambda x: jnp.sin(x))(y)
    y, _ = jax.lax.scan(lambda c, r: (c + r, None), y, jnp.ones((3, 4)))
    return y

  eqns = jax.make_jaxpr(f)(jnp.ones(4)).jaxpr.eqns
  kinds = [jaxpr_calls.kind(e) for e in eqns]
  assert [k for k in kinds if k] == ['jit', 'remat', 'scan'], kinds
  for e in eqns:
    if jaxpr_calls.kind(e):
      assert jaxpr_calls.sub_jaxpr(e).eqns  # an open jaxpr with equations
  jit_eqn = eqns[kinds.index('jit')]
  # A nested jit without shardings: the real class, not a name test.
  assert jaxpr_calls.UnspecifiedValue is not None
  assert all(jaxpr_calls.is_unspecified(s)
             for s in jit_eqn.params['in_shardings'])
  assert not jaxpr_calls.is_unspecified(None)
