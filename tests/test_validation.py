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


# --- Issue 26: inputs that used to pass unchecked -----------------------------


def _masked_loss(w, batch):
  err = (batch['x'] @ w - batch['y']) ** 2 * batch['mask']
  return jnp.sum(err) / jnp.maximum(jnp.sum(batch['mask']), 1.0)


@pytest.mark.parametrize('length', [4, 12])
def test_example_mask_of_another_length_than_the_batch_is_rejected(length):
  # B = 8, m = 4: a mask of 4 or 12 values is divisible by m but is not [B].
  batch = {'x': jnp.ones((8, 3)), 'y': jnp.arange(8.0),
           'mask': jnp.ones(8)}
  bad = lambda b: jnp.resize(b['mask'], (length,))
  match = rf'example_mask.*shape \[B\].*\({length},\).*B = 8'
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(grain_optax.group_value_and_grad(
        _masked_loss, 4, example_mask=bad), jnp.zeros(3), batch)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(grain_optax.grain_value_and_grad(
        _masked_loss, 4, example_mask=bad), jnp.zeros(3), batch)


def test_batch_leaf_of_another_leading_size_is_rejected_naming_both():
  # Class weights (10,) in a batch of B = 20 with m = 2: split silently before.
  batch = {'x': jnp.ones((20, 3)), 'y': jnp.zeros(20, jnp.int32),
           'class_weights': jnp.ones(10)}
  match = (r"\['x'\] has size 20 on axis 0.*\['class_weights'\] has 10|"
           r"\['class_weights'\] has size 10 on axis 0.*\['x'\] has 20")
  with pytest.raises(ValueError, match=match):
    grain_optax.split_into_groups(batch, 2)

  def loss_fn(w, b):
    return jnp.mean(b['class_weights'][b['y']] * (b['x'] @ w) ** 2)

  with pytest.raises(ValueError, match=match):
    jax.eval_shape(grain_optax.group_value_and_grad(loss_fn, 2),
                   jnp.zeros(3), batch)
  # One entry per group (a dropout key per group, as examples/flax_linen.py
  # does) is not per example and is still split, one per group; with it,
  # example_mask is still checked against B.
  batch = {'a_key': jax.random.split(jax.random.key(0), 4),
           'x': jnp.ones((8, 3)), 'y': jnp.arange(8.0), 'mask': jnp.ones(8)}
  assert grain_optax.split_into_groups(batch, 4)['a_key'].shape == (4, 1)
  fn = grain_optax.group_value_and_grad(_masked_loss, 4,
                                        example_mask=lambda b: b['mask'])
  assert jax.eval_shape(fn, jnp.zeros(3), batch)[2].shape == (4,)


def test_accumulate_buffer_dtype_must_be_floating():
  # An int32 buffer truncated the gradients 0.7 and 0.4 to 0: a zero update.
  for bad in (jnp.int32, 'int8', bool):
    with pytest.raises(ValueError, match=r'accumulate: buffer_dtype=.* not a '
                       r'floating dtype.*truncates'):
      grain_optax.accumulate(optax.sgd(1.0), every_k=2, buffer_dtype=bad)
  for good in (jnp.bfloat16, 'float32', None):
    grain_optax.accumulate(optax.sgd(1.0), every_k=2, buffer_dtype=good)


def test_integer_and_float0_per_group_grads_name_the_leaf_and_the_mask():
  params = {'w': jnp.zeros(3), 'step': jnp.array([1, 2], jnp.int32)}

  def loss_fn(p, x):
    return jnp.mean((x @ p['w']) ** 2) + 0.0 * jnp.sum(p['step'])

  x = grain_optax.split_into_groups(jnp.ones((8, 3)), 4)
  g = jax.vmap(jax.grad(loss_fn, allow_int=True), in_axes=(None, 0))(params, x)
  assert g['step'].dtype == jax.dtypes.float0
  tx = optax.chain(grain_optax.grain(), optax.sgd(0.1))
  int_g = dict(g, step=jnp.zeros((4, 2), jnp.int32))
  for grads, dtype in ((g, 'float0'), (int_g, 'int32')):
    with pytest.raises(ValueError, match=(
        rf"grain: leaf \['step'\] .* dtype {dtype} \(shape \(4, 2\)\).*"
        r'grain\(mask=\.\.\.\)')):
      tx.update(grads, tx.init(params), params)
  # Left out by the mask, as the message says: it trains the rest.
  tx = optax.chain(
      grain_optax.grain(mask=lambda p: jax.tree.map(
          lambda x: jnp.issubdtype(x.dtype, jnp.floating), p)),
      optax.sgd(0.1))
  for grads in (g, int_g):
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u['w'], -0.1 * g['w'][0], rtol=1e-6)


def test_communication_dtype_of_narrower_range_than_bfloat16_is_refused():
  # float16 overflowed above 65504 into an all-NaN update (every group
  # non-finite); the float8 types round to a few bits and overflow sooner.
  for bad, biggest in ((jnp.float16, '65504'), (jnp.float8_e4m3fn, '448'),
                       ('float8_e5m2', '57344')):
    with pytest.raises(ValueError, match=(
        rf'grain: communication_dtype=\w+ is refused.*{biggest}.*all NaN.*'
        r'jnp\.bfloat16')):
      grain_optax.grain(communication_dtype=bad)
    with pytest.raises(ValueError, match=r'min_norm_point: communication_'):
      grain_optax.min_norm_point({'w': jnp.ones((2, 3))},
                                 communication_dtype=bad)
  for good in (jnp.bfloat16, jnp.float32, jnp.float64, 'bfloat16', None):
    grain_optax.grain(communication_dtype=good)


def test_import_does_not_warn_about_jaxopt():
  # jaxopt is imported only when the projected-gradient solver is traced.
  import subprocess  # pylint: disable=g-import-not-at-top
  code = ('import sys, grain_optax; '
          "assert 'jaxopt' not in sys.modules, 'jaxopt imported'")
  out = subprocess.run(
      [sys.executable, '-W', 'error::DeprecationWarning', '-c', code],
      capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
