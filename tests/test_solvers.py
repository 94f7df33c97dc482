"""Properties of the min-norm simplex QP solvers."""

import functools
import os
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _xla_flags
from _asserts import assert_simplex
import grain_optax
import reference

SIZES = (1, 2, 3, 4, 8, 16, 32, 64, 128)


@functools.partial(jax.jit, static_argnames=('solver',))
def solve(gram, solver='exact'):
  return grain_optax.min_norm_weights(gram, solver=solver)


def random_gram(seed, m, rank, scale, common):
  """K = G G^T for m group gradients of a random rank plus a common part."""
  rng = np.random.default_rng(seed)
  p = max(rank, 1)
  g = rng.normal(size=(m, p)) * rng.uniform(0.2, 2.0, size=(m, 1))
  g = g + common * rng.normal(size=(1, p))
  g = g * scale
  return g, (g @ g.T).astype(np.float32)


gram_cases = st.tuples(
    st.integers(0, 2**31 - 1),                   # seed
    st.sampled_from(SIZES),                      # m
    st.sampled_from(('full', 'deficient', 'tiny')),
    st.sampled_from((0.0, 1e-15, 1e-6, 1.0, 1e6, 1e15)),
    st.sampled_from((0.0, 0.5, 10.0, 1e3)),      # common component
)


def _make(case):
  seed, m, rank_kind, scale, common = case
  rank = {'full': m + 5, 'deficient': max(m // 2, 1), 'tiny': 2}[rank_kind]
  return random_gram(seed, m, rank, scale, common)


# Cases that once returned non-optimal weights (issue 8: the interior start
# ended on a failed solve of an affinely dependent support).
REGRESSIONS = (
    (233, 128, 'tiny', 1e-15, 0.0),
    (233, 128, 'tiny', 1e-6, 0.0),
    (233, 128, 'tiny', 1.0, 0.0),
    # A Gram near float32's largest number (9e37): XLA's x * (1 / c) flushed
    # the normalised Gram to zero (found by the thorough profile).
    (0, 64, 'full', 1e15, 1e3),
)


def _with_regressions(test):
  for case in REGRESSIONS:
    test = hypothesis.example(case)(test)
  return test


@hypothesis.given(gram_cases)
@_with_regressions
def test_exact_solver_matches_float64_reference(case):
  _, k = _make(case)
  sol = solve(jnp.asarray(k))
  w = np.asarray(sol.weights)
  assert_simplex(w)
  w_ref = reference.reference_weights(k)
  # Same objective (the min-norm point d is unique even when w is not).
  assert reference.objective(k, w) <= reference.objective(k, w_ref) + 1e-6
  # KKT in float64: <d, g_i> >= ||d||^2 - tol for every group.
  assert reference.kkt_gap(k, w) <= 1e-6
  assert float(sol.kkt_residual) <= 1e-6


@hypothesis.given(gram_cases)
@_with_regressions
def test_kkt_equality_on_support(case):
  _, k = _make(case)
  w = np.asarray(solve(jnp.asarray(k)).weights, np.float64)
  scale = np.max(np.diag(k))
  kn = k / scale if scale > 0 else k
  kw = kn @ w
  obj = w @ kw
  support = w > 1e-3
  np.testing.assert_allclose(kw[support], obj, atol=1e-5)


@pytest.mark.parametrize('m', [2, 4, 8, 16, 32])
def test_weights_match_reference_when_unique(m):
  # Well-conditioned Grams of linearly independent groups: unique weights.
  for seed in range(5):
    _, k = random_gram(seed, m, rank=4 * m, scale=1.0, common=0.3)
    w = np.asarray(solve(jnp.asarray(k)).weights)
    np.testing.assert_allclose(w, reference.reference_weights(k), atol=1e-5)


@pytest.mark.parametrize('m', [2, 4, 8, 16])
def test_projected_gradient_agrees_with_exact(m):
  for seed in range(3):
    _, k = random_gram(seed, m, rank=3 * m, scale=1.0, common=0.3)
    exact = solve(jnp.asarray(k))
    pg = solve(jnp.asarray(k), solver='projected_gradient')
    assert_simplex(pg.weights, atol=1e-5)
    assert reference.objective(k, pg.weights) <= (
        reference.objective(k, exact.weights) + 1e-4)
    assert float(pg.kkt_residual) < 1e-2
    assert int(pg.num_iterations) >= 1


@hypothesis.given(st.integers(0, 2**31 - 1), st.sampled_from((2, 3, 8, 32)))
def test_permutation_invariance(seed, m):
  _, k = random_gram(seed, m, rank=m + 3, scale=1.0, common=0.5)
  perm = np.random.default_rng(seed).permutation(m)
  w = np.asarray(solve(jnp.asarray(k)).weights)
  w_perm = np.asarray(solve(jnp.asarray(k[np.ix_(perm, perm)])).weights)
  np.testing.assert_allclose(w_perm, w[perm], atol=1e-5)


@pytest.mark.parametrize('scale', [1e-15, 1e-6, 1.0, 1e6, 1e15])
def test_scale_invariance(scale):
  _, k = random_gram(3, 8, rank=12, scale=1.0, common=0.5)
  w1 = solve(jnp.asarray(k)).weights
  w2 = solve(jnp.asarray(k * np.float32(scale) ** 2 if scale < 1e10
                          else k * np.float32(scale))).weights
  np.testing.assert_allclose(w1, w2, atol=1e-5)


def test_single_group():
  sol = solve(jnp.array([[4.0]]))
  np.testing.assert_array_equal(sol.weights, [1.0])
  assert float(sol.kkt_residual) == 0.0


@pytest.mark.parametrize('solver', grain_optax.SOLVERS)
def test_all_zero_gram_gives_uniform_weights(solver):
  sol = solve(jnp.zeros((5, 5)), solver=solver)
  np.testing.assert_allclose(sol.weights, np.full(5, 0.2), rtol=1e-6)
  assert np.isfinite(float(sol.kkt_residual))


@pytest.mark.parametrize('m', [2, 5, 16])
def test_identical_groups_combine_to_the_mean(m):
  g = np.tile(np.array([[1.0, -2.0, 0.5]], np.float32), (m, 1))
  sol = solve(jnp.asarray(g @ g.T))
  assert_simplex(sol.weights)
  np.testing.assert_allclose(np.asarray(sol.weights) @ g, g[0], rtol=1e-6)
  assert float(sol.kkt_residual) <= 1e-6


def test_collinear_groups_pick_the_shortest():
  g = np.array([[1.0], [2.0], [5.0]])
  w = solve(jnp.asarray(g @ g.T)).weights
  np.testing.assert_allclose(w, [1.0, 0.0, 0.0], atol=1e-6)


def test_opposite_groups_cancel():
  g = np.array([[1.0, 0.0], [-2.0, 0.0]])
  sol = solve(jnp.asarray(g @ g.T, jnp.float32))
  np.testing.assert_allclose(sol.weights, [2 / 3, 1 / 3], atol=1e-6)
  d = np.asarray(sol.weights) @ g
  np.testing.assert_allclose(d, 0.0, atol=1e-6)


@pytest.mark.parametrize('solver', grain_optax.SOLVERS)
def test_non_finite_groups_are_excluded(solver):
  g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  k = g @ g.T
  k[1, :] = np.nan
  k[:, 1] = np.nan
  sol = solve(jnp.asarray(k), solver=solver)
  w = np.asarray(sol.weights)
  assert w[1] == 0.0
  assert_simplex(w, atol=1e-5)
  np.testing.assert_allclose(w, [1.0, 0.0, 0.0], atol=1e-4)


@pytest.mark.parametrize('solver', grain_optax.SOLVERS)
def test_all_groups_non_finite_gives_zero_weights(solver):
  sol = solve(jnp.full((3, 3), jnp.inf), solver=solver)
  np.testing.assert_array_equal(sol.weights, np.zeros(3))
  assert float(sol.kkt_residual) == 0.0


def test_mask_excludes_groups():
  g = np.eye(3, dtype=np.float32)
  w = grain_optax.min_norm_weights(jnp.asarray(g), mask=jnp.array([True, False, True])).weights
  np.testing.assert_allclose(w, [0.5, 0.0, 0.5], atol=1e-6)


def test_kkt_residual_measures_suboptimality():
  _, k = random_gram(0, 6, rank=10, scale=1.0, common=0.0)
  w = solve(jnp.asarray(k)).weights
  assert float(grain_optax.kkt_residual(k, w)) < 1e-6
  vertex = jnp.eye(6)[int(np.argmax(np.diag(k)))]
  assert float(grain_optax.kkt_residual(k, vertex)) > 1e-2


def test_bad_input_errors():
  with pytest.raises(ValueError, match='square'):
    grain_optax.min_norm_weights(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r'mask has shape \(2,\).*expected shape \(3,\)'):
    grain_optax.min_norm_weights(jnp.eye(3), mask=jnp.array([True, False]))
  with pytest.raises(ValueError, match=r'mask has shape \(4,\)'):
    grain_optax.kkt_residual(jnp.eye(3), jnp.ones(3) / 3, mask=np.ones(4, bool))
  with pytest.raises(ValueError, match='unknown solver'):
    grain_optax.min_norm_weights(jnp.eye(2), solver='newton')


def test_jit_does_not_retrace_across_values():
  import chex

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(k):
    return grain_optax.min_norm_weights(k).weights

  for seed in range(3):
    _, k = random_gram(seed, 4, rank=6, scale=1.0, common=0.0)
    f(jnp.asarray(k)).block_until_ready()


# Low-rank Grams with many groups (origin inside or near the hull): the regime
# where active-set solvers meet affinely dependent supports. Fixed seeds; every
# case must reach a float64 KKT residual of 1e-6.
FAMILY_RANKS = (1, 2, 3, 5, 8, 16)
FAMILY_SCALES = (1e-15, 1e-6, 1.0, 1e6, 1e12)


def _family(m):
  grams = []
  for rank in FAMILY_RANKS:
    for common in (0.0, 1.0):
      for i, scale in enumerate(FAMILY_SCALES):
        seed = 1000 * m + 10 * rank + i + int(10 * common)
        grams.append(random_gram(seed, m, rank, scale, common)[1])
  return np.stack(grams)


def _kkt64(grams, weights):
  k = grams.astype(np.float64)
  scale = np.max(np.diagonal(k, axis1=1, axis2=2), axis=1)
  k = k / scale[:, None, None]
  w = np.asarray(weights, np.float64)
  kw = np.einsum('bij,bj->bi', k, w)
  return np.max(np.einsum('bi,bi->b', w, kw)[:, None] - kw, axis=1)


def check_family(m):
  grams = _family(m)
  sol = jax.jit(jax.vmap(grain_optax.min_norm_weights))(jnp.asarray(grams))
  w = np.asarray(sol.weights, np.float64)
  assert np.all(w >= 0)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
  residual = _kkt64(grams, w)
  assert np.max(residual) <= 1e-6, (np.argmax(residual), np.max(residual))
  assert np.max(np.asarray(sol.kkt_residual)) <= 1e-6
  # It stops on KKT, not on the iteration cap.
  assert np.max(np.asarray(sol.num_iterations)) < 8 * m + 16


@pytest.mark.parametrize('m', [32, 64, 128, 256])
def test_low_rank_grams_with_many_groups_reach_kkt(m):
  if m < 128 or not _xla_flags.fast_flags_active():
    check_family(m)
    return
  # Heavy arithmetic: run at XLA's default optimisation (tests/_xla_flags.py).
  proc = subprocess.run(
      [sys.executable, '-c',
       f'import test_solvers; test_solvers.check_family({m}); print("OK")'],
      env=_xla_flags.default_flags_env(), cwd=os.path.dirname(__file__),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-4000:]


def test_grain_on_64_conflicting_two_dimensional_groups():
  # The origin is inside the hull: the optimum is d = 0, and no group may be
  # left with <d, g_i> < ||d||^2 (was -0.49 with a KKT residual of 2e-2).
  g = np.random.default_rng(3).normal(size=(64, 2)).astype(np.float32)
  params = {'w': jnp.zeros(2)}
  tx = grain_optax.grain(num_groups=64)
  d, state = jax.jit(tx.update)({'w': jnp.asarray(g)}, tx.init(params), params)
  d = np.asarray(d['w'], np.float64)
  g64 = g.astype(np.float64)
  largest = np.max(np.sum(g64 ** 2, axis=1))
  assert np.min(g64 @ d) >= d @ d - 1e-6 * largest
  assert np.linalg.norm(d) <= 1e-3 * np.sqrt(largest)
  assert float(state.kkt_residual) <= 1e-6


def test_injected_hyperparameters_may_be_traced():
  # optax.inject_hyperparams passes numeric options as arrays under jit.
  _, k = random_gram(5, 12, rank=3, scale=1.0, common=0.0)
  k = jnp.asarray(k)
  exact = jax.jit(lambda k, t, r, n: grain_optax.min_norm_weights(
      k, tolerance=t, regularization=r, max_iterations=n))(k, 1e-7, 1e-7, 200)
  assert float(exact.kkt_residual) <= 1e-6
  for step in (0.0, 0.02):  # 0: line search; > 0: fixed step
    traced = jax.jit(lambda k, t, s: grain_optax.min_norm_weights(
        k, solver='projected_gradient', tolerance=t, stepsize=s))(
            k, 1e-6, step)
    static = grain_optax.min_norm_weights(
        k, solver='projected_gradient', tolerance=1e-6, stepsize=step)
    assert_simplex(traced.weights, atol=1e-5)
    # Same rule, same result up to rounding (1000 approximate steps apart).
    np.testing.assert_allclose(reference.objective(k, traced.weights),
                               reference.objective(k, static.weights),
                               atol=1e-5)
    assert reference.objective(k, traced.weights) <= (
        reference.objective(k, exact.weights) + 1e-3)
  with pytest.raises(ValueError, match="static_args=\\('max_iterations',\\)"):
    jax.jit(lambda k, n: grain_optax.min_norm_weights(
        k, solver='projected_gradient', max_iterations=n))(k, 100)


def test_environment_variable_selects_the_backend():
  import subprocess
  import sys
  code = ('import jax.numpy as jnp, grain_optax; '
          'print(grain_optax.min_norm_weights(jnp.eye(2)).weights)')
  for value, ok in (('xla', True), ('AUTO', True), ('cuda', False)):
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True,
        env={**os.environ, 'GRAIN_OPTAX_EXACT_BACKEND': value,
             'JAX_PLATFORMS': 'cpu'}, check=False)
    assert (out.returncode == 0) == ok, out.stderr[-2000:]
    if ok:
      assert '[0.5 0.5]' in out.stdout
    else:
      assert "GRAIN_OPTAX_EXACT_BACKEND='cuda'" in out.stderr


@pytest.mark.parametrize('scale', [1e-15, 1e-9, 1e-3, 1e3, 1e9, 1e15])
def test_weights_do_not_depend_on_the_gradient_scale(scale):
  # Gradients (not Grams) scaled: entries of order 0.1 * scale, P = 64.
  rng = np.random.default_rng(11)
  g = (rng.normal(size=(6, 64)) * 0.1 + 0.05 * rng.normal(size=(1, 64)))
  g = g.astype(np.float32)
  w1 = solve(grain_optax.gram_matrix(jnp.asarray(g))).weights
  scaled = solve(grain_optax.gram_matrix(jnp.asarray(g * np.float32(scale))))
  np.testing.assert_allclose(scaled.weights, w1, atol=1e-5)
  assert float(scaled.kkt_residual) <= 1e-6


def test_where_the_scale_range_ends():
  # The README's documented limits of the float32 Gram.
  g = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
  # A group of norm 1e20 overflows its squared norm: excluded as non-finite.
  big = g.copy()
  big[2] *= np.float32(1e20)
  sol = solve(grain_optax.gram_matrix(jnp.asarray(big)))
  assert float(sol.weights[2]) == 0.0
  np.testing.assert_allclose(sol.weights[:2], [0.8, 0.2], atol=1e-6)
  # Entries of 1e-25 underflow every product: the Gram is zero and the
  # weights are uniform (the plain mean).
  tiny = grain_optax.gram_matrix(jnp.asarray(g * np.float32(1e-25)))
  np.testing.assert_array_equal(tiny, np.zeros((3, 3)))
  np.testing.assert_allclose(solve(tiny).weights, np.full(3, 1 / 3), rtol=1e-6)


@pytest.mark.parametrize('bad', [0, -2, 2.5, 3.0, True])
@pytest.mark.parametrize('entry', ['grain', 'accumulate', 'min_norm_weights',
                                   'solver_options'])
def test_max_iterations_must_be_a_positive_int_at_every_entry_point(bad, entry):
  # One rule for the option wherever it is given: a Python scalar must be an
  # int >= 1 (a float, even integral, or a bool is a mistake), named in the
  # error before anything is traced.
  gram = jnp.eye(2)
  build = {
      'grain': lambda: grain_optax.grain(max_iterations=bad),
      'accumulate': lambda: grain_optax.accumulate(
          grain_optax.grain(), every_k=2, max_iterations=bad),
      'min_norm_weights': lambda: grain_optax.min_norm_weights(
          gram, max_iterations=bad),
      'solver_options': lambda: grain_optax.min_norm_weights(
          gram, solver_options=grain_optax.SolverOptions(
              max_iterations=bad)),
  }[entry]
  with pytest.raises(ValueError, match='max_iterations must be an int >= 1'):
    build()


def test_min_norm_weights_accepts_numpy_int_max_iterations():
  sol = grain_optax.min_norm_weights(jnp.eye(2), max_iterations=np.int64(40))
  np.testing.assert_allclose(sol.weights, [0.5, 0.5], atol=1e-6)
