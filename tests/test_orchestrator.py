"""SolverOptions at every entry point, and one step policy for all of them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grain_optax

SolverOptions = grain_optax.SolverOptions


def per_group(seed=0, m=4):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=(m, 3, 4)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(m, 5)), jnp.float32)}


def params_of(g):
  return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:], x.dtype), g)


def grain_update(tx, g):
  return jax.jit(tx.update)(g, tx.init(params_of(g)), params_of(g))


def loss_fn(w, batch):
  return jnp.mean((batch['x'] @ w - batch['y']) ** 2)


BATCH = {'x': jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)),
                          jnp.float32),
         'y': jnp.arange(8, dtype=jnp.float32)}


def test_solver_options_is_public():
  assert 'SolverOptions' in grain_optax.__all__
  assert SolverOptions().solver == 'exact'


def test_xla_backends_give_the_default_update():
  # On the CPU the default backends are XLA's: bitwise the same update. On a
  # GPU the default Gram and exact solver are Pallas kernels, which sum in
  # another order: the same update to float32 rounding (6e-8 apart at most
  # on an H100).
  g = per_group()
  ref, ref_state = grain_update(grain_optax.grain(num_groups=4), g)
  options = SolverOptions(gram_backend='xla', exact_backend='xla')
  out, state = grain_update(
      grain_optax.grain(num_groups=4, solver_options=options), g)
  on_cpu = jax.default_backend() == 'cpu'
  for a, b in zip(jax.tree_util.tree_leaves((ref, ref_state)),
                  jax.tree_util.tree_leaves((out, state))):
    if on_cpu or not jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-6)


def test_solver_options_equal_the_flat_keywords_everywhere():
  g = per_group()
  flat = dict(solver='projected_gradient', tolerance=1e-5, max_iterations=50,
              stepsize=0.5)
  options = SolverOptions(**flat)
  pairs = [
      (grain_update(grain_optax.grain(**flat), g),
       grain_update(grain_optax.grain(solver_options=options), g)),
      (grain_optax.min_norm_point(g, **flat),
       grain_optax.min_norm_point(g, solver_options=options)),
      (grain_optax.min_norm_weights(grain_optax.gram_matrix(g), **flat),
       grain_optax.min_norm_weights(grain_optax.gram_matrix(g),
                                    solver_options=options)),
      (grain_optax.grain_value_and_grad(loss_fn, 4, **flat)(
          jnp.zeros(4), BATCH),
       grain_optax.grain_value_and_grad(loss_fn, 4, solver_options=options)(
           jnp.zeros(4), BATCH)),
  ]
  for a, b in pairs:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  params = {'w': jnp.zeros(3)}
  results = []
  for kwargs in (flat, {'solver_options': options}):
    tx = grain_optax.accumulate(optax.sgd(1.0), every_k=2, **kwargs)
    state = tx.init(params)
    _, state = tx.update({'w': jnp.array([1., 0., 1.])}, state, params)
    u, state = tx.update({'w': jnp.array([0., 2., -1.])}, state, params)
    results.append((u, state.stats))
  for x, y in zip(*map(jax.tree_util.tree_leaves, results)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('make', [
    lambda **kw: grain_optax.grain(**kw),
    lambda **kw: grain_optax.accumulate(optax.sgd(1.0), every_k=2, **kw),
    lambda **kw: grain_optax.grain_value_and_grad(loss_fn, 4, **kw),
    lambda **kw: grain_optax.min_norm_point(per_group(), **kw),
    lambda **kw: grain_optax.min_norm_weights(jnp.eye(3), **kw),
], ids=['grain', 'accumulate', 'lean', 'min_norm_point', 'min_norm_weights'])
def test_solver_options_with_a_conflicting_flat_keyword_is_an_error(make):
  options = SolverOptions(tolerance=1e-6)
  with pytest.raises(ValueError, match=r'solver_options.*tolerance=0\.001'):
    make(solver_options=options, tolerance=1e-3)
  with pytest.raises(ValueError, match=r'solver_options.*solver='):
    make(solver_options=options, solver='projected_gradient')
  # A flat keyword left at (or set to) its default is no conflict.
  make(solver_options=options, regularization=1e-7)
  with pytest.raises(TypeError, match='SolverOptions'):
    make(solver_options={'tolerance': 1e-6})


def test_bad_backends_name_the_option():
  with pytest.raises(ValueError, match='exact-solver backend'):
    grain_optax.grain(solver_options=SolverOptions(exact_backend='nope'))
  tx = grain_optax.grain(solver_options=SolverOptions(gram_backend='nope'))
  with pytest.raises(ValueError, match='gram_backend'):
    grain_update(tx, per_group())
  lean = grain_optax.grain_value_and_grad(
      loss_fn, 4, solver_options=SolverOptions(gram_backend='nope'))
  with pytest.raises(ValueError, match='gram_backend'):
    lean(jnp.zeros(4), BATCH)
  with pytest.raises(ValueError, match='gram_backend'):
    grain_optax.min_norm_point(
        per_group(), solver_options=SolverOptions(gram_backend='nope'))


def test_lean_mode_takes_a_fixed_stepsize():
  out = grain_optax.grain_value_and_grad(
      loss_fn, 4, solver='projected_gradient', stepsize=0.5,
      max_iterations=500, tolerance=1e-7)(jnp.zeros(4), BATCH)
  ref = grain_optax.grain_value_and_grad(loss_fn, 4)(jnp.zeros(4), BATCH)
  np.testing.assert_allclose(out.weights, ref.weights, atol=1e-3)


def test_grain_state_has_no_former_names():
  state = grain_optax.grain().init(None)
  assert not hasattr(state, 'solver_iterations')


@pytest.mark.parametrize('group_mask, expect', [
    (None, 'nan'), ([False, False, False, False], 'zero')])
def test_every_entry_point_follows_the_same_no_group_left_policy(
    group_mask, expect):
  g = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), per_group())
  mask = None if group_mask is None else jnp.array(group_mask)
  d, state = jax.jit(grain_optax.grain(num_groups=4).update)(
      g, grain_optax.grain(num_groups=4).init(None), group_mask=mask)
  batch = {'x': jnp.full((8, 4), jnp.nan), 'y': BATCH['y']}
  example_mask = None if group_mask is None else (
      lambda b: jnp.zeros(b['x'].shape[0], bool))
  lean = grain_optax.grain_value_and_grad(loss_fn, 4,
                                          example_mask=example_mask)(
                                              jnp.zeros(4), batch)
  for leaf in jax.tree_util.tree_leaves((d, lean.grads)):
    if expect == 'nan':
      assert np.all(np.isnan(np.asarray(leaf)))
    else:
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  nonfinite = 4 if expect == 'nan' else 0
  assert int(state.num_nonfinite) == int(lean.num_nonfinite) == nonfinite
  assert int(state.num_excluded) == int(lean.num_excluded) == 4 - nonfinite
