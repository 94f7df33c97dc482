"""What is applied (``apply=``) and the metrics for loggers (issue 22).

The four values of ``apply`` in grain(), accumulate() and the lean mode:
direction and length as documented, non-conflict where it holds, the monitor
update equal to the plain mean, under jit, with masks and non-finite groups,
and through an orbax checkpoint. The 8-device forms are checked in
tests/_sharding_devices.py (case ``apply``), run by test_min_norm_point.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import grain_optax

APPLY = ('grain', 'mean', 'mean_at_grain_length', 'grain_at_mean_length')


@pytest.fixture(autouse=True)
def _float32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def conflicting_groups(m=6, p=20, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=p)
  g = base + 0.5 * rng.normal(size=(m, p))
  g[0] = -0.8 * base + 0.5 * rng.normal(size=p)   # against the others
  return {'w': jnp.asarray(g[:, :15].reshape(m, 3, 5), jnp.float32),
          'b': jnp.asarray(g[:, 15:], jnp.float32)}


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1)
                         for x in jax.tree_util.tree_leaves(tree)])


def flat_groups(tree):
  m = jax.tree_util.tree_leaves(tree)[0].shape[0]
  return np.concatenate([np.asarray(x, np.float64).reshape(m, -1)
                         for x in jax.tree_util.tree_leaves(tree)], axis=1)


def assert_parallel(u, v, rtol=1e-5):
  cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
  assert cos > 1 - rtol, cos


def apply_grain(groups, apply, group_mask=None):
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), groups)
  tx = grain_optax.grain(num_groups=6, apply=apply)
  update = jax.jit(lambda g, s, mask: tx.update(g, s, params,
                                                group_mask=mask))
  return update(groups, tx.init(params), group_mask)


def test_default_is_the_min_norm_point_bit_for_bit():
  groups = conflicting_groups()
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), groups)
  plain = grain_optax.grain(num_groups=6)
  named = grain_optax.grain(num_groups=6, apply='grain')
  d0, s0 = jax.jit(plain.update)(groups, plain.init(params), params)
  d1, s1 = jax.jit(named.update)(groups, named.init(params), params)
  assert flat(d0).tobytes() == flat(d1).tobytes()
  assert flat(s0).tobytes() == flat(s1).tobytes()


@pytest.mark.parametrize('masked', [False, True])
def test_each_variant_has_the_stated_direction_and_length(masked):
  groups = conflicting_groups()
  mask = None
  if masked:
    # One group left out by the mask, one non-finite: both excluded.
    mask = jnp.array([True, True, False, True, True, True])
    groups = jax.tree_util.tree_map(lambda x: x.at[4].set(jnp.nan), groups)
  keep = np.array([True, True, not masked, True, not masked, True])
  g = flat_groups(groups)[keep]
  mean = g.mean(0)
  d, state = apply_grain(groups, 'grain', mask)
  d = flat(d)
  assert np.linalg.norm(d) < 0.9 * np.linalg.norm(mean)  # a real difference
  assert np.all(g @ d >= d @ d - 1e-5 * np.max(np.sum(g * g, 1)))
  assert float(state.mean_min_cosine) < 0 < float(state.min_cosine)
  for apply in APPLY[1:]:
    u, s = apply_grain(groups, apply, mask)
    u = flat(u)
    assert np.all(np.isfinite(u))
    # The state describes the min-norm point whatever is applied.
    np.testing.assert_array_equal(s.weights, state.weights)
    np.testing.assert_array_equal(s.norm_ratio, state.norm_ratio)
    np.testing.assert_array_equal(s.min_cosine, state.min_cosine)
    if apply == 'mean':
      np.testing.assert_allclose(u, mean, rtol=1e-5, atol=1e-6)
      assert float(s.update_min_cosine) == float(state.mean_min_cosine)
    elif apply == 'mean_at_grain_length':
      assert_parallel(u, mean)
      np.testing.assert_allclose(np.linalg.norm(u), np.linalg.norm(d),
                                 rtol=1e-5)
      assert float(s.update_min_cosine) == float(state.mean_min_cosine)
    else:
      assert_parallel(u, d)
      np.testing.assert_allclose(np.linalg.norm(u), np.linalg.norm(mean),
                                 rtol=1e-5)
      assert np.all(g @ u >= -1e-5 * np.linalg.norm(u) * np.max(
          np.linalg.norm(g, axis=1)))         # no group's loss rises
      assert float(s.update_min_cosine) == float(state.min_cosine)
    assert int(s.num_nonfinite) == int(masked)
    assert int(s.num_excluded) == int(masked)


def test_monitor_mode_equals_the_chain_without_grain():
  rng = np.random.default_rng(3)
  params = {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  batch = {'x': jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}

  def loss_fn(p, b):
    return jnp.mean((jnp.tanh(b['x'] @ p['w']) - b['y']) ** 2)

  monitored = optax.chain(grain_optax.grain(num_groups=4, apply='mean'),
                          optax.adamw(1e-2))
  plain = optax.adamw(1e-2)

  @jax.jit
  def step(p, s, q, t):
    _, grads = grain_optax.group_value_and_grad(loss_fn, 4)(p, batch)
    u, s = monitored.update(grads, s, p)
    v, t = plain.update(jax.grad(loss_fn)(q, batch), t, q)
    return optax.apply_updates(p, u), s, optax.apply_updates(q, v), t

  p, s, q, t = params, monitored.init(params), params, plain.init(params)
  for _ in range(5):
    p, s, q, t = step(p, s, q, t)
  np.testing.assert_allclose(p['w'], q['w'], rtol=1e-5, atol=1e-6)
  assert int(s[0].count) == 5 and float(s[0].norm_ratio) > 0


def test_variants_in_accumulate_equal_grain_on_the_window():
  groups = conflicting_groups(m=3)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), groups)
  # accumulate() hands the window to the same run() as grain(): two values
  # (the monitor mode and a rescaling) cover its wiring.
  for apply in ('mean', 'mean_at_grain_length'):
    tx = grain_optax.accumulate(optax.sgd(1.0), every_k=3, apply=apply)
    ref = optax.chain(grain_optax.grain(num_groups=3, apply=apply),
                      optax.sgd(1.0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(3):
      u, state = update(jax.tree_util.tree_map(lambda x: x[i], groups),
                        state, params)
    v, ref_state = jax.jit(ref.update)(groups, ref.init(params), params)
    np.testing.assert_allclose(flat(u), flat(v), rtol=1e-5, atol=1e-6,
                               err_msg=apply)
    np.testing.assert_allclose(state.stats.update_min_cosine,
                               ref_state[0].update_min_cosine, atol=1e-6)


@pytest.mark.parametrize('apply', APPLY)
def test_variants_in_the_lean_mode_equal_the_default_mode(apply):
  rng = np.random.default_rng(1)
  params = {'w': jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
  x = rng.normal(size=(12, 5))
  batch = {'x': jnp.asarray(x, jnp.float32),
           'y': jnp.asarray(np.sign(x[:, :2]) * (1 + np.arange(12) % 3)[:, None],
                            jnp.float32)}

  def loss_fn(p, b):
    return jnp.mean((b['x'] @ p['w'] - b['y']) ** 2)

  lean = jax.jit(grain_optax.grain_value_and_grad(loss_fn, 4, apply=apply))(
      params, batch)
  _, grads = grain_optax.group_value_and_grad(loss_fn, 4)(params, batch)
  tx = grain_optax.grain(num_groups=4, apply=apply)
  d, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(lean.grads['w'], d['w'], rtol=1e-5, atol=1e-6)
  for name in ('norm_ratio', 'min_cosine', 'mean_min_cosine',
               'update_min_cosine', 'effective_groups', 'num_nonfinite',
               'num_excluded'):
    np.testing.assert_allclose(getattr(lean, name), getattr(state, name),
                               rtol=1e-5, atol=1e-6, err_msg=name)
  if apply == 'mean':
    np.testing.assert_allclose(lean.grads['w'],
                               jax.grad(loss_fn)(params, batch)['w'],
                               rtol=1e-5, atol=1e-6)


def test_a_bad_apply_names_the_values():
  for make in (lambda a: grain_optax.grain(apply=a),
               lambda a: grain_optax.accumulate(optax.sgd(1.), every_k=2,
                                                apply=a),
               lambda a: grain_optax.grain_value_and_grad(
                   lambda p, b: 0.0, 2, apply=a)):
    with pytest.raises(ValueError, match="apply='monitor'.*'mean'"):
      make('monitor')


def test_variant_state_resumes_bitwise_from_an_orbax_checkpoint(tmp_path):
  rng = np.random.default_rng(2)
  params = {'w': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
            'b': jnp.zeros(3)}
  xs = jnp.asarray(rng.normal(size=(8, 16, 6)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(8, 16, 3)), jnp.float32)

  def loss_fn(p, b):
    return jnp.mean((jnp.tanh(b['x'] @ p['w'] + p['b']) - b['y']) ** 2)

  tx = optax.chain(
      grain_optax.grain(num_groups=4, apply='mean'),
      grain_optax.accumulate(optax.sgd(0.1, momentum=0.9), every_k=3,
                             apply='mean_at_grain_length'))

  @jax.jit
  def step(p, s, i):
    _, grads = grain_optax.group_value_and_grad(loss_fn, 4)(
        p, {'x': xs[i], 'y': ys[i]})
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  def train(p, s, steps):
    for i in steps:
      p, s = step(p, s, i)
    return p, s

  p_half, s_half = train(params, tx.init(params), range(4))  # mid-window
  p_full, s_full = train(p_half, s_half, range(4, 8))
  path = tmp_path / 'ckpt'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {'params': p_half, 'opt_state': s_half})
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(
        path, {'params': params, 'opt_state': tx.init(params)})
  p_again, s_again = train(restored['params'], restored['opt_state'],
                           range(4, 8))
  for a, b in zip(jax.tree_util.tree_leaves((p_full, s_full)),
                  jax.tree_util.tree_leaves((p_again, s_again))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert int(s_full[1].stats.count) == 2


# ---------------------------------------------------------------------------
# metrics()


KEYS = ('count', 'conflict', 'mean_min_cosine', 'update_min_cosine',
        'min_norm_min_cosine', 'norm_ratio', 'effective_groups',
        'num_nonfinite', 'num_excluded', 'solver_iterations', 'kkt_residual')


def test_metrics_outside_jit_are_python_scalars_for_any_logger():
  groups = conflicting_groups()
  _, state = apply_grain(groups, 'mean')
  logs = grain_optax.metrics(state)
  assert list(logs) == [f'grain/{k}' for k in KEYS]
  assert logs['grain/conflict'] is True
  assert type(logs['grain/num_nonfinite']) is int
  assert type(logs['grain/norm_ratio']) is float
  assert 1.0 <= logs['grain/effective_groups'] <= 6.0
  assert logs['grain/norm_ratio'] == pytest.approx(float(state.norm_ratio))
  json.dumps(logs)   # a JSON-lines log takes it as it is
  assert list(grain_optax.metrics(state, prefix='train/', sep='.'))[0] == (
      'train/grain.count')


def test_metrics_inside_jit_are_arrays_and_find_every_grain_in_a_chain():
  groups = conflicting_groups(m=4)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), groups)
  tx = optax.chain(grain_optax.grain(num_groups=4),
                   grain_optax.accumulate(optax.adam(1e-3), every_k=2))

  @jax.jit
  def step(g, s):
    u, s = tx.update(g, s, params)
    return s, grain_optax.metrics(s)

  state = tx.init(params)
  for _ in range(2):
    state, logs = step(groups, state)
  assert set(logs) == {f'{n}/{k}' for n in ('grain', 'accumulate')
                       for k in KEYS}
  assert all(isinstance(v, jax.Array) and v.shape == () for v in logs.values())
  assert bool(logs['grain/conflict'])
  # Outside jit the same values, as Python scalars.
  outside = grain_optax.metrics(state)
  for k, v in logs.items():
    assert outside[k] == pytest.approx(v.item()), k
  # accumulate's window of two identical gradients: no conflict, the mean.
  assert outside['accumulate/conflict'] is False
  assert outside['accumulate/norm_ratio'] == pytest.approx(1.0, abs=1e-5)


def test_metrics_of_the_lean_result():
  def loss_fn(w, b):
    return jnp.mean((b['x'] @ w - b['y']) ** 2)
  batch = {'x': jnp.eye(4), 'y': jnp.array([1., 1., -2., 2.])}
  out = grain_optax.grain_value_and_grad(loss_fn, 2)(jnp.zeros(4), batch)
  logs = grain_optax.metrics(out)
  assert list(logs) == [f'grain/{k}' for k in KEYS]
  assert logs['grain/norm_ratio'] == pytest.approx(float(out.norm_ratio))
  assert grain_optax.metrics(optax.sgd(1.).init(jnp.zeros(2))) == {}
