"""grain() composed with optax wrappers: what works, and what fails clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _asserts import params_like
import grain_optax


def per_group(seed, m=4):
  rng = np.random.default_rng(seed)
  return {'head': jnp.asarray(rng.normal(size=(m, 3)), jnp.float32),
          'body': {'w': jnp.asarray(rng.normal(size=(m, 2, 2)), jnp.float32),
                   'b': jnp.asarray(rng.normal(size=(m,)), jnp.float32)}}


TRAINABLE = {'head': True, 'body': False}


# --- A subset of the parameters ---------------------------------------------


def test_masked_grain_fails_at_trace_time_saying_what_to_write():
  g = per_group(0)
  params = params_like(g)
  tx = optax.masked(optax.chain(grain_optax.grain(num_groups=4), optax.sgd(0.1)),
                    TRAINABLE)
  with pytest.raises(ValueError, match=r'optax\.masked.*grain_optax\.grain\(mask=mask\)'):
    jax.eval_shape(tx.update, g, tx.init(params), params)


def test_multi_transform_with_grain_inside_fails_at_trace_time():
  g = per_group(1)
  params = params_like(g)
  labels = {'head': 'train', 'body': 'frozen'}
  tx = optax.multi_transform(
      {'train': optax.chain(grain_optax.grain(), optax.sgd(0.1)),
       'frozen': optax.set_to_zero()}, labels)
  with pytest.raises(ValueError, match='multi_transform'):
    jax.eval_shape(tx.update, g, tx.init(params), params)


def test_grain_mask_uses_only_the_trainable_leaves():
  g = per_group(2)
  params = params_like(g)
  tx = grain_optax.grain(num_groups=4, mask=TRAINABLE)
  d, state = jax.jit(tx.update)(g, tx.init(params), params)
  # GRAIN on the trainable leaves alone: optimal weights for their Gram
  # matrix (not for the whole tree's), and d combines them.
  head = np.asarray(g['head'], np.float64)
  whole = np.concatenate([np.asarray(x, np.float64).reshape(4, -1)
                          for x in jax.tree_util.tree_leaves(g)], axis=1)
  w = np.asarray(state.weights, np.float64)
  assert float(grain_optax.kkt_residual(head @ head.T, w)) < 1e-6
  assert float(grain_optax.kkt_residual(whole @ whole.T, w)) > 1e-2
  np.testing.assert_allclose(d['head'], w @ head, rtol=1e-5, atol=1e-6)
  # Frozen leaves get a zero update of the param's shape.
  for leaf, p in zip(jax.tree_util.tree_leaves(d['body']),
                     jax.tree_util.tree_leaves(params['body'])):
    assert leaf.shape == p.shape
    np.testing.assert_array_equal(leaf, np.zeros(p.shape))


def test_frozen_leaves_do_not_influence_the_weights():
  g = per_group(3)
  params = params_like(g)
  # The mask in the params' full structure (TRAINABLE is a prefix of it).
  tx = grain_optax.grain(num_groups=4,
                         mask={'head': True, 'body': {'w': False, 'b': False}})
  update = jax.jit(tx.update)
  _, s1 = update(g, tx.init(params), params)
  g2 = dict(g, body=jax.tree_util.tree_map(lambda x: 1e6 * x.at[0].set(jnp.nan),
                                          g['body']))
  d2, s2 = update(g2, tx.init(params), params)
  np.testing.assert_array_equal(s1.weights, s2.weights)
  assert int(s2.num_nonfinite) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(d2))


def test_frozen_params_stay_put_through_adamw_with_weight_decay():
  mask = lambda p: {'head': True, 'body': False}  # a function of params
  params = jax.tree_util.tree_map(jnp.ones_like, params_like(per_group(0)))
  tx = optax.chain(grain_optax.grain(mask=mask),
                   optax.masked(optax.adamw(0.1, weight_decay=0.5), mask))
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for seed in range(3):  # several steps: shapes must stay those of params
    params, state = step(params, state, per_group(seed))
  for leaf in jax.tree_util.tree_leaves(params['body']):
    np.testing.assert_array_equal(leaf, np.ones(leaf.shape))
  assert params['head'].shape == (3,)
  assert not np.allclose(params['head'], 1.0)


def test_bad_masks_raise_clear_errors():
  g = per_group(0)
  params = params_like(g)
  fn_tx = grain_optax.grain(mask=lambda p: TRAINABLE)
  with pytest.raises(ValueError, match='function of the params.*update needs them'):
    fn_tx.update(g, fn_tx.init(params))
  none_tx = grain_optax.grain(mask={'head': False, 'body': False})
  with pytest.raises(ValueError, match='False for every leaf'):
    none_tx.update(g, none_tx.init(params), params)
  wrong_tx = grain_optax.grain(mask={'head': True, 'tail': False})
  with pytest.raises(ValueError, match='tree structure of the params'):
    wrong_tx.update(g, wrong_tx.init(params), params)
  traced = lambda flag: grain_optax.grain(
      mask={'head': flag, 'body': True}).update(g, None, params)
  with pytest.raises(ValueError, match=r"\['head'\].*Python bools"):
    jax.jit(traced)(True)


# --- Non-finite steps and optax.apply_if_finite -------------------------------


def test_apply_if_finite_after_grain_skips_a_wholly_non_finite_step():
  params = {'w': jnp.ones(3)}
  tx = optax.chain(grain_optax.grain(),
                   optax.apply_if_finite(optax.adam(0.1), 3))
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  good = {'w': jnp.array([[1., 0., 0.], [0., 1., 0.]])}
  u, state = step(good, tx.init(params), params)
  params = optax.apply_updates(params, u)
  before = params
  nan = {'w': jnp.full((2, 3), jnp.nan)}
  u, skipped = step(nan, state, params)
  assert int(skipped[1].notfinite_count) == 1
  assert int(skipped[0].num_nonfinite) == 2
  params = optax.apply_updates(params, u)
  # Skipped: params unmoved (no momentum step on a zero update) ...
  np.testing.assert_array_equal(params['w'], before['w'])
  # ... and the next step is the one that would have followed without it.
  u1, _ = step(good, skipped, params)
  u2, _ = step(good, state, params)
  np.testing.assert_array_equal(u1['w'], u2['w'])


def test_one_non_finite_group_is_dropped_not_skipped():
  params = {'w': jnp.zeros(3)}
  tx = optax.chain(grain_optax.grain(),
                   optax.apply_if_finite(optax.sgd(1.0), 3))
  g = {'w': jnp.array([[1., 0., 0.], [jnp.nan, 1., 0.]])}
  u, state = jax.jit(tx.update)(g, tx.init(params), params)
  assert int(state[1].notfinite_count) == 0
  np.testing.assert_allclose(u['w'], [-1., 0., 0.])


def test_grain_inside_apply_if_finite_fails_saying_what_to_write():
  g = per_group(0)
  params = params_like(g)
  tx = optax.apply_if_finite(
      optax.chain(grain_optax.grain(num_groups=4), optax.adam(0.1)), 3)
  with pytest.raises(ValueError, match=r'apply_if_finite.*optax\.chain\(grain_optax\.grain\(\), optax\.apply_if_finite'):
    jax.eval_shape(tx.update, g, tx.init(params), params)


def test_grain_inside_multisteps_fails_pointing_to_accumulate():
  g = per_group(0)
  params = params_like(g)
  tx = optax.MultiSteps(optax.chain(grain_optax.grain(), optax.sgd(0.1)), 2)
  with pytest.raises(ValueError, match=r'MultiSteps.*grain_optax\.accumulate'):
    tx.update(g, tx.init(params), params)


# --- optax.inject_hyperparams ---------------------------------------------------


def test_inject_hyperparams_with_projected_gradient():
  g = per_group(4)
  params = params_like(g)
  injected = optax.inject_hyperparams(
      grain_optax.grain, static_args=('num_groups',))(
          num_groups=4, solver='projected_gradient')
  plain = grain_optax.grain(num_groups=4, solver='projected_gradient')
  d, state = jax.jit(injected.update)(g, injected.init(params), params)
  ref, ref_state = jax.jit(plain.update)(g, plain.init(params), params)
  for a, b in zip(jax.tree_util.tree_leaves(d), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.inner_state.weights, ref_state.weights,
                             atol=1e-6)


def test_injected_max_iterations_with_projected_gradient_says_static_args():
  tx = optax.inject_hyperparams(grain_optax.grain)(
      solver='projected_gradient', max_iterations=50)
  with pytest.raises(ValueError, match=r"static_args=\('max_iterations',\)"):
    tx.init({'w': jnp.zeros(2)})


# --- Things only params can reveal, and the order of the chain ----------------


def test_ordinary_gradient_with_params_is_rejected_at_trace_time():
  params = {'w': jnp.zeros((4, 3))}
  tx = optax.chain(grain_optax.grain(), optax.sgd(0.1))
  grad = {'w': jnp.ones((4, 3))}  # no group axis: rows are not groups
  with pytest.raises(ValueError, match=r"\['w'\].*ordinary gradient"):
    jax.eval_shape(tx.update, grad, tx.init(params), params)


def test_clipping_before_grain_scales_by_the_norm_of_all_groups():
  g = {'w': jnp.array([[3., 0.], [0., 4.]])}
  params = {'w': jnp.zeros(2)}
  d = {'w': jnp.array([1.92, 1.44])}  # weights (16, 9) / 25: <d, g_i> equal
  # Before grain: every group scaled by 1 / ||(g_1, g_2)|| = 1/5; the weights
  # do not change (scale invariance), so d is scaled by 1/5.
  before = optax.chain(optax.clip_by_global_norm(1.0), grain_optax.grain())
  u, _ = jax.jit(before.update)(g, before.init(params), params)
  np.testing.assert_allclose(u['w'], d['w'] / 5.0, rtol=1e-5)
  # After grain: d itself clipped to norm 1.
  after = optax.chain(grain_optax.grain(), optax.clip_by_global_norm(1.0))
  u, _ = jax.jit(after.update)(g, after.init(params), params)
  norm = float(jnp.linalg.norm(d['w']))
  assert norm > 1.0
  np.testing.assert_allclose(u['w'], d['w'] / norm, rtol=1e-5)


# --- Wrappers that hand grain()'s input to something else (issue 26 N6) -------


def _sgd_after_grain():
  return optax.chain(grain_optax.grain(num_groups=4), optax.sgd(0.1))


@pytest.mark.parametrize('wrapper, match', [
    (lambda: optax.contrib.sam(_sgd_after_grain(), optax.sgd(0.1)),
     r'optax\.contrib\.sam.*optax\.chain\(grain_optax\.grain\(\), '
     r'optax\.contrib\.sam\('),
    (lambda: optax.contrib.sam(optax.sgd(0.1), _sgd_after_grain(),
                               opaque_mode=True),
     r'optax\.contrib\.sam'),
    (lambda: optax.contrib.mechanize(_sgd_after_grain()),
     r'optax\.contrib\.mechanize.*optax\.chain\(grain_optax\.grain\(\), '
     r'optax\.contrib\.mechanize\(inner\)\)'),
    (lambda: optax.flatten(_sgd_after_grain()),
     r'optax\.flatten.*optax\.chain\(grain_optax\.grain\(\), '
     r'optax\.flatten\(inner\)\)'),
], ids=['sam', 'sam_opaque', 'mechanize', 'flatten'])
def test_grain_inside_sam_mechanize_or_flatten_fails_naming_the_wrapper(
    wrapper, match):
  # sam leaked a group axis into the params ((4,), (4, 3)); mechanize and
  # flatten failed with errors that did not name them.
  g = per_group(0)
  params = params_like(g)
  tx = wrapper()
  extra = {'grad_fn': lambda p, i: g} if 'sam' in match else {}
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda g, s, p: tx.update(g, s, p, **extra), g,
                   tx.init(params), params)


@pytest.mark.parametrize('inner', [
    lambda: optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.1)),
    lambda: optax.contrib.mechanize(optax.sgd(0.1)),
    lambda: optax.flatten(optax.sgd(0.1)),
], ids=['sam', 'mechanize', 'flatten'])
def test_sam_mechanize_and_flatten_after_grain_work(inner):
  g = per_group(0)
  params = params_like(g)
  tx = optax.chain(grain_optax.grain(num_groups=4), inner())
  u, _ = jax.eval_shape(tx.update, g, tx.init(params), params)
  assert jax.tree.map(lambda x: x.shape, u) == jax.tree.map(
      jnp.shape, params)
