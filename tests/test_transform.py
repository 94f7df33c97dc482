"""Properties of the grain() optax transformation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _asserts import assert_non_conflicting
from _asserts import params_like
import grain_optax


def per_group(seed, m, dtype=jnp.float32, common=0.0):
  rng = np.random.default_rng(seed)
  shared = rng.normal(size=(1, 7))
  return {
      'w': jnp.asarray(rng.normal(size=(m, 3, 4)) + common * shared[:, :1, None], dtype),
      'b': jnp.asarray(rng.normal(size=(m, 7)) + common * shared, dtype),
  }


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                         for x in jax.tree_util.tree_leaves(tree)], axis=1)


@pytest.mark.parametrize('m', [2, 4, 8])
@pytest.mark.parametrize('solver', grain_optax.SOLVERS)
def test_update_has_nonnegative_inner_product_with_every_group(m, solver):
  g = per_group(m, m, common=0.3)
  tx = grain_optax.grain(num_groups=m, solver=solver)
  d, state = jax.jit(tx.update)(g, tx.init(params_like(g)))
  gf = flat(g)
  # Leaves in tree order, as in flat(): 'b' then 'w'.
  df = np.concatenate([np.asarray(d['b']).ravel(), np.asarray(d['w']).ravel()])
  tol = 1e-5 if solver == 'exact' else 1e-2
  assert_non_conflicting(gf, df, rtol=tol)
  assert float(state.min_cosine) >= -1e-6
  assert 0.0 <= float(state.norm_ratio) <= 1.0 + 1e-6
  np.testing.assert_allclose(np.asarray(state.weights).sum(), 1.0, atol=1e-5)
  np.testing.assert_allclose(df, np.asarray(state.weights, np.float64) @ gf,
                             rtol=1e-5, atol=1e-6)


def test_single_group_returns_its_input():
  g = per_group(0, 1)
  d, _ = grain_optax.grain().update(g, grain_optax.grain().init(None))
  for k in g:
    np.testing.assert_array_equal(d[k], g[k][0])


@pytest.mark.parametrize('m', [2, 3, 8])
def test_identical_groups_return_the_mean(m):
  one = per_group(5, 1)
  g = jax.tree_util.tree_map(lambda x: jnp.repeat(x, m, axis=0), one)
  d, state = grain_optax.grain(num_groups=m).update(g, grain_optax.grain(num_groups=m).init(None))
  for k in g:
    np.testing.assert_allclose(d[k], one[k][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(state.norm_ratio), 1.0, rtol=1e-5)


def test_permuting_groups_does_not_change_the_update():
  g = per_group(3, 6, common=0.2)
  perm = np.array([3, 0, 5, 1, 4, 2])
  gp = jax.tree_util.tree_map(lambda x: x[perm], g)
  tx = grain_optax.grain()
  d1, _ = tx.update(g, tx.init(None))
  d2, _ = tx.update(gp, tx.init(None))
  for k in g:
    np.testing.assert_allclose(d1[k], d2[k], rtol=1e-5, atol=1e-6)


def test_conflict_is_visible_in_the_state():
  # Two groups that the mean would make worse: mean·g_1 < 0.
  g = {'w': jnp.array([[1.0, 0.0], [-3.0, 1.0]])}
  tx = grain_optax.grain(num_groups=2)
  _, state = tx.update(g, tx.init(None))
  assert float(state.mean_min_cosine) < 0.0
  assert float(state.min_cosine) >= 0.0
  assert float(state.norm_ratio) < 1.0
  assert int(state.count) == 1


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_is_preserved(dtype):
  g = per_group(1, 4, dtype)
  tx = optax.chain(grain_optax.grain(), optax.sgd(0.1))
  params = params_like(g)
  updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
  for k in g:
    assert updates[k].dtype == dtype


def test_state_types_are_stable_under_cond():
  g = per_group(2, 4)
  tx = grain_optax.grain(num_groups=4)
  state = tx.init(params_like(g))

  def step(flag, state):
    return jax.lax.cond(flag, lambda s: tx.update(g, s)[1], lambda s: s, state)

  new_state = jax.jit(step)(True, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
  chex.assert_trees_all_equal_structs(state, new_state)


def test_init_accepts_shape_dtype_structs():
  params = {'w': jax.ShapeDtypeStruct((3, 4), jnp.float32)}
  state = grain_optax.grain(num_groups=3).init(params)
  assert state.weights.shape == (3,)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      optax.chain(grain_optax.grain(), optax.adamw(1e-3)).init(params),
      jax.eval_shape(optax.chain(grain_optax.grain(), optax.adamw(1e-3)).init, params))


def test_no_retracing_across_steps():
  tx = optax.chain(grain_optax.grain(num_groups=4), optax.adamw(1e-3))
  params = params_like(per_group(0, 4))
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for seed in range(4):
    params, state = step(params, state, per_group(seed, 4))


def _donated_leaves_aliased(step, state, *args):
  """(state leaves, those that alias an output) of ``jit(step)`` donating state."""
  lowered = jax.jit(step, donate_argnums=0).lower(state, *args)
  main = next(line for line in lowered.as_text().splitlines()
              if 'func.func public @main' in line)
  return len(jax.tree_util.tree_leaves(state)), main.count('tf.aliasing_output')


@pytest.mark.parametrize('name', ['grain', 'monitor', 'accumulate'])
def test_every_state_leaf_is_donated_in_a_jitted_step(name):
  # The statistics are written, never read, by an update; if jit pruned them
  # as unused inputs they would land in fresh buffers on every call (on a GPU,
  # XLA then re-records the step's CUDA graph each time).
  make = {'grain': lambda: grain_optax.grain(num_groups=4),
          'monitor': lambda: grain_optax.grain(num_groups=4, apply='mean'),
          'accumulate': lambda: grain_optax.accumulate(optax.sgd(0.1),
                                                       every_k=4)}[name]
  tx = optax.chain(make(), optax.adamw(1e-3))
  params = params_like(per_group(0, 4))
  state = tx.init(params)

  def step(state, params, g):
    updates, state = tx.update(g, state, params)
    return state, optax.apply_updates(params, updates)

  g = per_group(1, 4)
  if name == 'accumulate':
    g = jax.tree_util.tree_map(lambda x: x[0], g)
  leaves, aliased = _donated_leaves_aliased(step, state, params, g)
  assert aliased == leaves


def test_chain_forwards_extra_args():
  g = per_group(0, 3)
  params = params_like(g)
  tx = optax.chain(grain_optax.grain(), optax.adamw(1e-3))
  updates, _ = tx.update(g, tx.init(params), params, value=jnp.float32(1.0),
                         grad=None, some_flag=True)
  assert updates['w'].shape == (3, 4)
  # Ignored: the same update as without them.
  plain, _ = tx.update(g, tx.init(params), params)
  chex.assert_trees_all_equal(updates, plain)


def test_inject_hyperparams():
  tx = optax.inject_hyperparams(grain_optax.grain, static_args=('num_groups',))(
      num_groups=3, tolerance=1e-7, regularization=1e-7)
  g = per_group(4, 3)
  state = tx.init(params_like(g))
  ref, _ = grain_optax.grain(num_groups=3).update(g, grain_optax.grain(num_groups=3).init(None))
  d, state = jax.jit(tx.update)(g, state)
  for k in g:
    np.testing.assert_allclose(d[k], ref[k], rtol=1e-6, atol=1e-7)
  state.hyperparams['tolerance'] = jnp.float32(1e-5)
  d2, _ = jax.jit(tx.update)(g, state)
  assert d2['w'].shape == (3, 4)
  # The injected tolerance is the one used: as grain(tolerance=1e-5).
  loose = grain_optax.grain(num_groups=3, tolerance=1e-5)
  ref2, _ = loose.update(g, loose.init(None))
  for k in g:
    np.testing.assert_allclose(d2[k], ref2[k], rtol=1e-6, atol=1e-7)


def test_non_finite_group_is_excluded_and_counted():
  g = per_group(6, 4)
  g['w'] = g['w'].at[2, 0, 0].set(jnp.nan)
  g['b'] = g['b'].at[1, 3].set(jnp.inf)
  tx = grain_optax.grain(num_groups=4)
  d, state = jax.jit(tx.update)(g, tx.init(None))
  for k in d:
    assert np.all(np.isfinite(d[k]))
  assert int(state.num_nonfinite) == 2
  w = np.asarray(state.weights)
  assert w[1] == 0.0 and w[2] == 0.0
  # Same as GRAIN over the finite groups alone.
  finite = jax.tree_util.tree_map(lambda x: x[np.array([0, 3])], g)
  ref, _ = grain_optax.grain().update(finite, grain_optax.grain().init(None))
  for k in d:
    np.testing.assert_allclose(d[k], ref[k], rtol=1e-5, atol=1e-6)


def test_all_groups_non_finite_give_a_nan_update_and_a_flag():
  # NaN, not zeros: a wholly non-finite step must stay visible downstream
  # (optax.apply_if_finite after grain() skips it; see test_composition.py).
  g = {'w': jnp.full((3, 5), jnp.nan)}
  tx = grain_optax.grain(num_groups=3)
  d, state = tx.update(g, tx.init(None))
  assert np.all(np.isnan(d['w'])) and d['w'].shape == (5,)
  assert int(state.num_nonfinite) == 3


def test_all_zero_gradients_give_zero_update():
  g = {'w': jnp.zeros((4, 5))}
  tx = grain_optax.grain(num_groups=4)
  d, state = tx.update(g, tx.init(None))
  np.testing.assert_array_equal(d['w'], np.zeros(5))
  assert float(state.norm_ratio) == 0.0 and float(state.kkt_residual) == 0.0


def test_bad_inputs_raise_clear_errors():
  tx = grain_optax.grain()
  with pytest.raises(ValueError, match=r"\['b'\].*2 groups"):
    tx.update({'a': jnp.zeros((3, 2)), 'b': jnp.zeros((2, 2))}, tx.init(None))
  with pytest.raises(ValueError, match=r"\['a'\].*per-group shape is \(4,\).*expected shape \(3, 2\)"):
    tx.update({'a': jnp.zeros((3, 4))}, tx.init(None), {'a': jnp.zeros(2)})
  with pytest.raises(ValueError, match='tree structures'):
    tx.update({'a': jnp.zeros((3, 4))}, tx.init(None), {'z': jnp.zeros(4)})
  with pytest.raises(ValueError, match=r'3 groups.*num_groups=4'):
    t4 = grain_optax.grain(num_groups=4)
    t4.update({'a': jnp.zeros((3, 4))}, t4.init(None))
  with pytest.raises(ValueError, match='num_groups must be a positive int'):
    grain_optax.grain(num_groups=0)
  with pytest.raises(ValueError, match='unknown solver'):
    grain_optax.grain(solver='magic')


def test_errors_are_raised_at_trace_time():
  tx = grain_optax.grain()
  f = jax.jit(tx.update)
  with pytest.raises(ValueError, match='groups'):
    jax.eval_shape(f, {'a': jnp.zeros((3, 2)), 'b': jnp.zeros((2, 2))}, tx.init(None))
