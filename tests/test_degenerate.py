"""Degenerate batches: empty (all-padding) groups and 0 in the convex hull."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grain_optax


def test_a_zero_group_makes_the_update_zero_and_the_state_says_so():
  # The math: 0 in the hull gives d = 0 (documented, not a bug).
  tx = grain_optax.grain(num_groups=3)
  update = jax.jit(tx.update)
  g = {'w': jnp.array([[1., 2.], [3., -1.], [0., 0.]])}
  d, state = update(g, tx.init(None))
  np.testing.assert_allclose(d['w'], [0., 0.], atol=1e-5)
  np.testing.assert_allclose(state.weights, [0., 0., 1.], atol=1e-5)
  assert float(state.norm_ratio) == 0.0 and float(state.min_cosine) == 0.0
  assert int(state.num_nonfinite) == 0
  # Groups that cancel: the same (d = 0, no group left out).
  opposite = {'w': jnp.array([[1., 2.], [-2., -4.], [-1., -2.]])}
  d, state = update(opposite, tx.init(None))
  np.testing.assert_allclose(d['w'], [0., 0.], atol=1e-5)
  assert float(state.norm_ratio) == 0.0 and float(state.min_cosine) == 0.0


def test_group_mask_excludes_empty_groups():
  rng = np.random.default_rng(0)
  g = {'w': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
       'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  g = jax.tree_util.tree_map(lambda x: x.at[2].set(jnp.nan), g)  # padding
  mask = jnp.array([True, True, False, True])
  tx = grain_optax.grain(num_groups=4)
  update = jax.jit(tx.update)
  d, state = update(g, tx.init(None), group_mask=mask)
  # The same hull without group 2: group 0 twice (a duplicate does not move
  # the min-norm point), every group taking part.
  dup = jax.tree_util.tree_map(lambda x: x.at[2].set(x[0]), g)
  ref, _ = update(dup, tx.init(None), group_mask=jnp.ones(4, bool))
  for k in g:
    np.testing.assert_allclose(d[k], ref[k], rtol=1e-5, atol=1e-6)
  assert float(jnp.linalg.norm(d['w'])) > 1e-3
  assert float(state.weights[2]) == 0.0
  assert int(state.num_nonfinite) == 0  # excluded, not non-finite


def test_no_group_taking_part_gives_a_zero_update():
  g = {'w': jnp.full((2, 3), jnp.nan)}
  tx = grain_optax.grain(num_groups=2)
  d, state = jax.jit(tx.update)(g, tx.init(None),
                                group_mask=jnp.array([False, False]))
  np.testing.assert_array_equal(d['w'], np.zeros(3))
  assert int(state.num_nonfinite) == 0


def test_group_mask_passes_through_a_chain_and_other_members_ignore_it():
  params = {'w': jnp.zeros(2)}
  tx = optax.chain(grain_optax.grain(), optax.adam(0.1))
  g = {'w': jnp.array([[1., 0.], [0., 0.]])}
  u, _ = jax.jit(tx.update)(g, tx.init(params), params,
                            group_mask=jnp.array([1, 0]))
  assert float(u['w'][0]) < 0.0  # not frozen by the zero group


def _padded_problem():
  """3-class softmax regression; the last of 4 groups is all padding."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 4)).astype(np.float32)
  y = np.argmax(x[:, :3] + 0.3 * rng.normal(size=(32, 3)), axis=1)
  mask = np.ones(32, np.float32)
  mask[24:] = 0.0
  batch = {'x': jnp.asarray(x), 'y': jnp.asarray(y), 'mask': jnp.asarray(mask)}

  def loss_fn(params, batch):
    logits = batch['x'] @ params['w']
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])
    return jnp.sum(nll * batch['mask']) / jnp.maximum(jnp.sum(batch['mask']), 1.)

  return loss_fn, batch, {'w': jnp.zeros((4, 3))}


def test_padded_batch_trains_with_example_mask_and_freezes_without():
  loss_fn, batch, params0 = _padded_problem()
  tx = optax.chain(grain_optax.grain(num_groups=4), optax.sgd(0.5))
  grads_fn = grain_optax.group_value_and_grad(
      loss_fn, 4, example_mask=lambda b: b['mask'])

  @jax.jit
  def run(use_mask):
    def step(carry, _):
      params, state = carry
      _, grads, group_mask = grads_fn(params, batch)
      group_mask = jnp.where(use_mask, group_mask, True)
      u, state = tx.update(grads, state, params, group_mask=group_mask)
      return (optax.apply_updates(params, u), state), None
    (params, state), _ = jax.lax.scan(step, (params0, tx.init(params0)),
                                      None, length=20)
    return loss_fn(params, batch), state

  frozen, _ = run(False)
  trained, state = run(True)
  np.testing.assert_allclose(float(frozen), np.log(3.0), rtol=1e-6)
  assert float(trained) < 0.8
  assert float(state[0].weights[3]) == 0.0


def test_example_mask_gives_the_group_mask():
  loss_fn, batch, params = _padded_problem()
  f = grain_optax.group_value_and_grad(loss_fn, 4,
                                       example_mask=lambda b: b['mask'])
  losses, grads, group_mask = f(params, batch)
  np.testing.assert_array_equal(group_mask, [True, True, True, False])
  assert losses.shape == (4,) and grads['w'].shape == (4, 4, 3)
  with pytest.raises(ValueError, match=r'example_mask.*shape \[B\].*\(4, 8\)'):
    grain_optax.group_value_and_grad(
        loss_fn, 4, example_mask=lambda b: b['mask'].reshape(4, 8))(params, batch)


def test_lean_mode_takes_the_example_mask_too():
  loss_fn, batch, params = _padded_problem()
  params = {'w': jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)),
                             jnp.float32)}
  out = jax.jit(grain_optax.grain_value_and_grad(
      loss_fn, 4, example_mask=lambda b: b['mask']))(params, batch)
  _, grads = grain_optax.group_value_and_grad(loss_fn, 4)(params, batch)
  assert float(out.weights[3]) == 0.0 and int(out.num_nonfinite) == 0
  np.testing.assert_allclose(out.grads['w'],
                             jnp.tensordot(out.weights, grads['w'], 1),
                             rtol=1e-4, atol=1e-6)
  # Optimal over the three groups with examples: KKT on them.
  assert float(grain_optax.kkt_residual(
      out.gram, out.weights, mask=jnp.array([True, True, True, False]))) < 1e-5
  assert float(jnp.linalg.norm(out.grads['w'])) > 1e-3


def test_group_mask_with_groups_spread_over_devices_is_each_devices_own():
  # jax.vmap with axis_name stands in for 2 devices of a shard_map (the
  # collective path; tests/test_min_norm_point.py runs real devices).
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=(2, 2, 5)), jnp.float32)  # [device, k, P]
  g = g.at[0, 1].set(0.0).at[1, 0].set(jnp.nan)            # two empty groups
  mask = jnp.array([[True, False], [False, True]])          # each device's own
  tx = grain_optax.grain(axis_name='dev', num_groups=4)
  spread = jax.jit(jax.vmap(
      lambda g, m: tx.update({'w': g}, tx.init(None), group_mask=m),
      axis_name='dev'))
  d, state = spread(g, mask)
  ref_tx = grain_optax.grain(num_groups=4)
  ref, ref_state = jax.jit(ref_tx.update)(
      {'w': g.reshape(4, 5)}, ref_tx.init(None), group_mask=mask.reshape(4))
  for i in range(2):
    np.testing.assert_allclose(d['w'][i], ref['w'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights[i], ref_state.weights, atol=1e-6)
  assert float(jnp.linalg.norm(ref['w'])) > 0.1  # the zero group is left out
  np.testing.assert_array_equal(ref_state.weights[1:3], [0.0, 0.0])
  assert int(state.num_nonfinite[0]) == 0


def test_group_mask_of_the_wrong_shape_is_rejected():
  g = {'w': jnp.ones((3, 2))}
  tx = grain_optax.grain()
  with pytest.raises(ValueError, match=r'group_mask has shape \(2,\).*3 groups'):
    tx.update(g, tx.init(None), group_mask=jnp.array([True, False]))


def test_accumulate_leaves_out_a_masked_micro_batch():
  params = {'w': jnp.zeros(2)}
  tx = grain_optax.accumulate(optax.sgd(1.0), every_k=3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  # An all-padding micro-batch has a zero gradient; left out with
  # microbatch_mask=False, the window's min-norm point is that of the others.
  _, state = step({'w': jnp.array([1.0, 0.0])}, state, params)
  _, state = step({'w': jnp.zeros(2)}, state, params,
                  microbatch_mask=jnp.array(False))
  u, state = step({'w': jnp.array([0.0, 2.0])}, state, params)
  np.testing.assert_allclose(u['w'], [-0.8, -0.4], atol=1e-6)
  np.testing.assert_allclose(state.stats.weights, [0.8, 0.0, 0.2], atol=1e-6)
  assert int(state.stats.num_nonfinite) == 0
  # The mask belongs to its window only: the next window uses every slot.
  for g in ([1.0, 0.0], [0.0, 1.0], [1.0, 1.0]):
    u, state = step({'w': jnp.array(g)}, state, params)
  np.testing.assert_allclose(state.stats.weights, [0.5, 0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match='microbatch_mask must be a scalar'):
    tx.update({'w': jnp.zeros(2)}, state, params, microbatch_mask=jnp.ones(2))


def test_accumulate_hands_nan_to_inner_when_a_whole_window_is_non_finite():
  params = {'w': jnp.ones(2)}
  inner = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=3)
  tx = grain_optax.accumulate(inner, every_k=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step({'w': jnp.array([jnp.nan, 0.0])}, state, params)
  u, state = step({'w': jnp.array([jnp.inf, 1.0])}, state, params)
  assert int(state.inner_state.notfinite_count) == 1
  np.testing.assert_array_equal(u['w'], np.zeros(2))
  assert int(state.stats.num_nonfinite) == 2


@pytest.mark.parametrize('m, p', [(16, 8), (64, 32), (256, 64)])
def test_min_cosine_is_never_negative_near_degenerate_problems(m, p):
  # More groups than dimensions: 0 is (nearly) in the hull, d is rounding
  # noise, and its cosines must not be reported as a conflict (issue 26 N3:
  # they went to -8e-3 before). The seeds include such cases for every shape.
  tx = grain_optax.grain(num_groups=m)
  update = jax.jit(lambda g: tx.update({'w': g}, tx.init(None))[1])
  for seed in range(12):
    g = np.random.default_rng(seed).normal(size=(m, p))
    state = update(jnp.asarray(g, jnp.float32))
    assert float(state.min_cosine) >= 0.0, (seed, float(state.min_cosine))
    assert float(state.kkt_residual) < 1e-6


def test_python_float_param_leaf_is_accepted_as_in_optax():
  # docs/guides/solvers.md: a Python float leaf in params is accepted.
  params = {'w': jnp.zeros(2), 'b': 0.0}
  tx = optax.chain(grain_optax.grain(num_groups=2), optax.sgd(1.0))
  per_group = {'w': jnp.ones((2, 2)), 'b': jnp.array([1.0, -3.0])}
  updates, _ = tx.update(per_group, tx.init(params), params)
  assert updates['b'].dtype == jnp.float32
  np.testing.assert_allclose(updates['b'], 0.0, atol=1e-6)  # w = [.75, .25]
  np.testing.assert_allclose(updates['w'], -1.0, atol=1e-6)
