"""Properties of accumulate(): GRAIN across mini-batches."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _asserts import assert_non_conflicting
import grain_optax


def grads(seed, k, common=0.0, dtype=jnp.float32):
  """k params-shaped gradients {'w': [3, 4], 'b': [5]}, as a list."""
  rng = np.random.default_rng(seed)
  shared_w, shared_b = rng.normal(size=(3, 4)), rng.normal(size=5)
  return [{'w': jnp.asarray(rng.normal(size=(3, 4)) + common * shared_w, dtype),
           'b': jnp.asarray(rng.normal(size=5) + common * shared_b, dtype)}
          for _ in range(k)]


def stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def params_like(g):
  return jax.tree_util.tree_map(jnp.ones_like, g)


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree_util.tree_leaves(tree)])


@functools.lru_cache(maxsize=None)
def _jitted_grain(m):
  tx = grain_optax.grain(num_groups=m)
  return tx.init(None), jax.jit(tx.update)


def grain_of_stacked(per_group):
  """grain() on per-group updates: (update, GrainState)."""
  state, update = _jitted_grain(jax.tree_util.tree_leaves(per_group)[0].shape[0])
  return update(per_group, state)


def grain_of(trees):
  """grain() on the trees stacked on a group axis: (update, GrainState)."""
  return grain_of_stacked(stack(trees))


def run(tx, gs, params, **extra_args):
  """Feeds the gradients one call at a time; returns all updates and the state."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for g in gs:
    u, state = update(g, state, params, **extra_args)
    outs.append(u)
  return outs, state


@pytest.mark.parametrize('k', [3])
def test_holds_k_minus_one_calls_then_steps_the_inner_once(k):
  gs = grads(k, 2 * k)
  params = params_like(gs[0])
  inner = optax.adamw(1e-2)
  tx = grain_optax.accumulate(inner, every_k=k)
  state = tx.init(params)
  inner0 = inner.init(params)
  update = jax.jit(tx.update)
  for i, g in enumerate(gs):
    u, state = update(g, state, params)
    closes = (i + 1) % k == 0
    assert int(state.mini_step) == (i + 1) % k
    assert int(state.stats.count) == (i + 1) // k
    assert int(state.inner_state[0].count) == (i + 1) // k
    if not closes:
      for leaf in jax.tree_util.tree_leaves(u):
        np.testing.assert_array_equal(leaf, 0.0)
      if i < k:  # inner state untouched while the first window fills
        chex.assert_trees_all_equal(state.inner_state, inner0)
    else:
      assert all(np.all(np.asarray(leaf) != 0)
                 for leaf in jax.tree_util.tree_leaves(u))


@pytest.mark.parametrize('k,solver', [(4, 'exact'), (2, 'projected_gradient')])
def test_equals_grain_on_the_stacked_gradients(k, solver):
  gs = grads(10 + k, 2 * k, common=0.5)
  params = params_like(gs[0])
  tx = grain_optax.accumulate(optax.adamw(1e-2), every_k=k, solver=solver)
  outs, state = run(tx, gs, params)
  ref = optax.chain(grain_optax.grain(num_groups=k, solver=solver),
                    optax.adamw(1e-2))
  ref_state = ref.init(params)
  for window in range(2):
    ref_u, ref_state = jax.jit(ref.update)(
        stack(gs[window * k:(window + 1) * k]), ref_state, params)
    chex.assert_trees_all_close(outs[(window + 1) * k - 1], ref_u,
                                rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.stats.weights, ref_state[0].weights,
                             rtol=1e-6, atol=1e-7)
  for field in ('kkt_residual', 'norm_ratio', 'min_cosine', 'mean_min_cosine'):
    np.testing.assert_allclose(getattr(state.stats, field),
                               getattr(ref_state[0], field), atol=1e-6)
  chex.assert_trees_all_close(state.inner_state, ref_state[1],
                              rtol=1e-6, atol=1e-7)


def test_grain_within_and_across_batches_composes():
  # chain(grain(), accumulate(...)) on k micro-batches of m groups each equals
  # grain() on each micro-batch, then grain() over the k results.
  k, m = 3, 4
  micro = [stack(grads(20 + j, m, common=0.3)) for j in range(k)]
  params = params_like(grads(0, 1)[0])
  tx = optax.chain(grain_optax.grain(num_groups=m),
                   grain_optax.accumulate(optax.sgd(1.0), every_k=k))
  outs, state = run(tx, micro, params)
  ds = [grain_of_stacked(g)[0] for g in micro]
  d, across_state = grain_of(ds)
  chex.assert_trees_all_close(outs[-1], jax.tree_util.tree_map(jnp.negative, d),
                              rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state[1].stats.weights, across_state.weights,
                             rtol=1e-6, atol=1e-7)
  # The within-batch statistics are those of the last micro-batch.
  np.testing.assert_allclose(
      state[0].weights,
      grain_of_stacked(micro[-1])[1].weights, rtol=1e-6)


def test_no_micro_batch_is_made_worse_to_first_order():
  # Conflicting micro-batches: the mean (MultiSteps) points against one of
  # them; accumulate's update has <d, g_j> >= ||d||^2 for every j.
  gs = [{'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([-0.9, 0.2])},
        {'w': jnp.array([0.3, 1.0])}]
  params = {'w': jnp.zeros(2)}
  outs, state = run(grain_optax.accumulate(optax.sgd(1.0), every_k=3), gs,
                    params)
  d = -flat(outs[-1])
  g = np.stack([flat(x) for x in gs])
  assert_non_conflicting(g, d, atol=1e-6)
  assert float(state.stats.min_cosine) >= -1e-6
  mean_outs, _ = run(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=3), gs,
                     params)
  mean = -flat(mean_outs[-1])
  np.testing.assert_allclose(mean, g.mean(0), rtol=1e-6)
  assert np.min(g @ mean) < 0
  assert float(state.stats.mean_min_cosine) < 0


def test_identical_micro_batches_give_the_same_step_as_multisteps():
  g = grads(3, 1)[0]
  params = params_like(g)
  gs = [g] * 8
  ours, state = run(grain_optax.accumulate(optax.adamw(1e-2), every_k=4), gs,
                    params)
  theirs, _ = run(optax.MultiSteps(optax.adamw(1e-2), every_k_schedule=4), gs,
                  params)
  for a, b in zip(ours, theirs):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  # Any convex weights are optimal here; the step is the mean either way.
  np.testing.assert_allclose(np.sum(state.stats.weights), 1.0, rtol=1e-6)


def test_multisteps_cannot_wrap_grain_but_can_follow_it():
  m, k = 4, 2
  micro = [stack(grads(30 + j, m)) for j in range(k)]
  params = params_like(grads(0, 1)[0])
  # MultiSteps sums its input into a params-shaped accumulator, so the group
  # axis that grain() needs is gone: the chain inside it rejects the input.
  wrapped = optax.MultiSteps(
      optax.chain(grain_optax.grain(), optax.sgd(1.0)), every_k_schedule=k)
  with pytest.raises(ValueError, match='per-group'):
    wrapped.update(micro[0], wrapped.init(params), params)
  # grain() first, then MultiSteps: GRAIN within batches, mean across them.
  mean_across = optax.chain(grain_optax.grain(),
                            optax.MultiSteps(optax.sgd(1.0), every_k_schedule=k))
  outs, _ = run(mean_across, micro, params)
  ds = [grain_of_stacked(x)[0] for x in micro]
  expected = jax.tree_util.tree_map(lambda *xs: -sum(xs) / k, *ds)
  chex.assert_trees_all_close(outs[-1], expected, rtol=1e-6, atol=1e-7)


def test_bfloat16_buffer_halves_memory_and_keeps_update_dtype():
  k = 3
  gs = grads(4, k, common=0.5)
  params = params_like(gs[0])
  tx = grain_optax.accumulate(optax.sgd(1.0), every_k=k,
                              buffer_dtype=jnp.bfloat16)
  state = tx.init(params)
  for b, p in zip(jax.tree_util.tree_leaves(state.buffer),
                  jax.tree_util.tree_leaves(params)):
    assert b.dtype == jnp.bfloat16 and b.shape == (k,) + p.shape
    assert b.nbytes == k * p.nbytes // 2
  full = grain_optax.accumulate(optax.sgd(1.0), every_k=k).init(params)
  assert sum(x.nbytes for x in jax.tree_util.tree_leaves(full.buffer)) == (
      k * sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))
  outs, _ = run(tx, gs, params)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(outs[-1]))
  # Equals GRAIN on the bf16-rounded gradients.
  rounded = stack([jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), g)
                   for g in gs])
  d, _ = grain_of_stacked(rounded)
  chex.assert_trees_all_close(
      outs[-1], jax.tree_util.tree_map(lambda x: -x.astype(jnp.float32), d),
      rtol=1e-2, atol=1e-2)


def test_every_k_one_is_the_inner_transformation():
  gs = grads(5, 3)
  params = params_like(gs[0])
  ours, _ = run(grain_optax.accumulate(optax.adam(1e-2), every_k=1), gs, params)
  theirs, _ = run(optax.adam(1e-2), gs, params)
  for a, b in zip(ours, theirs):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_every_k_schedule_with_a_static_buffer():
  # Windows of 2, then 3, 3, ...: the buffer has max_every_k = 3 slots.
  gs = grads(6, 8, common=0.4)
  params = params_like(gs[0])
  tx = grain_optax.accumulate(
      optax.sgd(1.0), every_k=lambda step: jnp.where(step == 0, 2, 3),
      max_every_k=3)
  outs, state = run(tx, gs, params)
  zero = [all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u))
          for u in outs]
  assert zero == [True, False, True, True, False, True, True, False]
  assert int(state.stats.count) == 3 and int(state.mini_step) == 0
  for end, start in ((2, 0), (5, 2), (8, 5)):
    d, gstate = grain_of(gs[start:end])
    chex.assert_trees_all_close(outs[end - 1],
                                jax.tree_util.tree_map(jnp.negative, d),
                                rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.stats.weights, gstate.weights, rtol=1e-6)
  # A window of 2 in a 3-slot buffer gives the unused slot weight 0.
  _, state2 = run(tx, gs[:2], params)
  assert float(state2.stats.weights[2]) == 0.0


def test_inner_inside_inject_hyperparams():
  gs = grads(7, 4)
  params = params_like(gs[0])
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  tx = grain_optax.accumulate(inner, every_k=2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(gs[0], state, params)
  u1, state = update(gs[1], state, params)
  hp = state.inner_state.hyperparams
  state = state._replace(inner_state=state.inner_state._replace(
      hyperparams={**hp, 'learning_rate': jnp.asarray(0.5)}))
  _, state = update(gs[2], state, params)
  u2, state = update(gs[3], state, params)
  d1, _ = grain_of(gs[:2])
  d2, _ = grain_of(gs[2:])
  chex.assert_trees_all_close(u1, jax.tree_util.tree_map(lambda x: -x, d1),
                              rtol=1e-6)
  chex.assert_trees_all_close(u2, jax.tree_util.tree_map(lambda x: -0.5 * x, d2),
                              rtol=1e-6)


def test_accumulate_inside_inject_hyperparams_with_injected_every_k():
  gs = grads(8, 5, common=0.3)
  params = params_like(gs[0])
  tx = optax.inject_hyperparams(grain_optax.accumulate, static_args=('max_every_k',))(
      optax.sgd(1.0), every_k=2, max_every_k=3, tolerance=1e-7)
  state = tx.init(params)
  assert set(state.hyperparams) >= {'every_k', 'tolerance'}
  update = jax.jit(tx.update)
  outs = []
  for i, g in enumerate(gs):
    if i == 2:  # from the second window on, windows of 3
      state.hyperparams['every_k'] = jnp.asarray(3)
    u, state = update(g, state, params)
    outs.append(u)
  assert [bool(np.any(np.asarray(u['w']) != 0)) for u in outs] == [
      False, True, False, False, True]
  d, _ = grain_of(gs[2:5])
  chex.assert_trees_all_close(outs[4], jax.tree_util.tree_map(jnp.negative, d),
                              rtol=1e-6, atol=1e-7)


def _recording_inner():
  """An inner transformation that needs `value` and remembers the last one."""

  def init_fn(params):
    del params
    return (jnp.zeros([], jnp.float32),)

  def update_fn(updates, state, params=None, *, value, **extra_args):
    del params, extra_args, state
    return updates, (jnp.asarray(value, jnp.float32),)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_extra_args_reach_the_inner_on_the_closing_call():
  gs = [stack(grads(9 + j, 2)) for j in range(4)]
  params = params_like(grads(0, 1)[0])
  tx = optax.chain(grain_optax.grain(),
                   grain_optax.accumulate(_recording_inner(), every_k=2))
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for i, g in enumerate(gs):
    _, state = update(g, state, params, value=jnp.asarray(float(i + 1)))
    seen.append(float(state[1].inner_state[0]))
  assert seen == [0.0, 2.0, 2.0, 4.0]


def test_no_retracing_and_stable_state_types():
  traces = []
  gs = grads(11, 6)
  params = params_like(gs[0])
  tx = optax.chain(grain_optax.accumulate(optax.adamw(1e-3), every_k=3))

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state, params)

  state0 = tx.init(params)
  state = state0
  for g in gs:
    _, state = step(g, state)
  assert len(traces) == 1
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  # Both branches of a lax.cond around update agree on the state's type.
  pick = jax.jit(lambda p, g, s: jax.lax.cond(
      p, lambda: tx.update(g, s, params)[1], lambda: s))
  chex.assert_trees_all_equal_shapes_and_dtypes(pick(True, gs[0], state0),
                                                state0)


def test_a_non_finite_micro_batch_is_excluded():
  gs = grads(12, 3)
  bad = jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan), gs[1])
  params = params_like(gs[0])
  outs, state = run(grain_optax.accumulate(optax.sgd(1.0), every_k=3),
                    [gs[0], bad, gs[2]], params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(outs[-1]))
  assert int(state.stats.num_nonfinite) == 1
  assert float(state.stats.weights[1]) == 0.0
  d, _ = grain_of([gs[0], gs[2]])
  chex.assert_trees_all_close(outs[-1], jax.tree_util.tree_map(jnp.negative, d),
                              rtol=1e-6, atol=1e-7)


def test_clear_errors():
  params = {'layer': {'w': jnp.zeros((3, 4))}}
  tx = grain_optax.accumulate(optax.sgd(1.0), every_k=2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*\(4, 3, 4\).*grain"):
    tx.update({'layer': {'w': jnp.zeros((4, 3, 4))}}, state, params)
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*\(3, 5\)"):
    tx.update({'layer': {'w': jnp.zeros((3, 5))}}, state, params)
  with pytest.raises(ValueError, match='tree structures'):
    tx.update({'w': jnp.zeros((3, 4))}, state, params)
  with pytest.raises(ValueError, match='every_k must be >= 1'):
    grain_optax.accumulate(optax.sgd(1.0), every_k=0)
  with pytest.raises(ValueError, match='max_every_k'):
    grain_optax.accumulate(optax.sgd(1.0), every_k=lambda step: 2)
  with pytest.raises(ValueError, match='unknown solver'):
    grain_optax.accumulate(optax.sgd(1.0), every_k=2, solver='newton')
  with pytest.raises(TypeError, match='GradientTransformation'):
    grain_optax.accumulate(optax.sgd, every_k=2)
