"""exact.py and wolfe.py: the exact solver on each backend (the GPU kernel
in interpret mode on the CPU).

On CUDA GPUs ``min_norm_weights(solver='exact')`` runs its whole algorithm
as one Pallas kernel (no host round trip); elsewhere the same algorithm runs
under XLA with Cholesky solves. Both must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grain_optax
from grain_optax._src import exact
from grain_optax._src import solvers
from grain_optax._src import wolfe


def gram(seed, m, p, common=0.3):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(m, p)) * rng.uniform(0.3, 2.0, size=(m, 1))
  g = g + common * rng.normal(size=(1, p))
  return (g @ g.T).astype(np.float32)


def solve_with(backend, k):
  return jax.jit(lambda k: grain_optax.min_norm_weights(
      k, exact_backend=backend))(k)


CASES = {
    'full_support': gram(0, 6, 64),
    # Many groups in 2 and 3 dimensions: the origin is inside the hull and
    # supports of the interior start are affinely dependent (issue 8).
    'low_rank_origin_inside': gram(3, 40, 2, common=0.0),
    'partial_support': gram(1, 12, 5, common=0.0),
    'many_groups': gram(2, 20, 400),
    'zero': np.zeros((4, 4), np.float32),
    'identical': np.full((5, 5), 2.0, np.float32),
}


def test_kernel_that_fails_to_trace_falls_back_with_a_warning(monkeypatch):
  # As on a GPU whose probe passed, where the kernel then cannot be traced
  # (Pallas raising ValueError): XLA runs it, and a warning says why.
  monkeypatch.setattr(exact.kernel_probe, 'gpu_present', lambda: True)
  monkeypatch.setattr(exact.kernel_probe, 'passes', lambda *args: True)
  monkeypatch.setattr(jax.lax, 'platform_dependent',
                      lambda *args, cuda, default: cuda(*args))

  def fails(*args, **kwargs):
    raise ValueError('cannot type the outputs here')

  monkeypatch.setattr(exact, 'run_pallas', fails)
  k = jnp.asarray(CASES['partial_support'])
  with pytest.warns(RuntimeWarning, match=(
      "exact solver's Pallas GPU kernel.*ValueError: cannot type")):
    got = solve_with('auto', k)
  np.testing.assert_array_equal(got.weights, solve_with('xla', k).weights)


@pytest.mark.parametrize('name', sorted(CASES))
def test_kernel_matches_xla(name):
  k = jnp.asarray(CASES[name])
  xla = solve_with('xla', k)
  kernel = solve_with('pallas_interpret', k)
  kn = np.asarray(k, np.float64) / max(float(np.max(np.diag(k))), 1e-30)
  objective = lambda w: float(np.asarray(w) @ kn @ np.asarray(w))
  # The min-norm point is unique; the weights are where K is non-singular.
  np.testing.assert_allclose(objective(kernel.weights),
                             objective(xla.weights), atol=1e-6)
  if name not in ('partial_support', 'low_rank_origin_inside'):
    np.testing.assert_allclose(kernel.weights, xla.weights, atol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(kernel.weights)), 1.0, atol=1e-6)
  assert float(jnp.min(kernel.weights)) >= 0.0
  assert float(kernel.kkt_residual) <= 1e-6


def test_kernel_excludes_non_finite_groups():
  k = CASES['full_support'].copy()
  k[2, :] = np.nan
  k[:, 2] = np.nan
  kernel = solve_with('pallas_interpret', jnp.asarray(k))
  assert float(kernel.weights[2]) == 0.0
  np.testing.assert_allclose(float(jnp.sum(kernel.weights)), 1.0, atol=1e-6)
  assert float(kernel.kkt_residual) <= 1e-6


def test_kernel_probe_runs_eagerly_inside_a_trace():
  # On GPUs the kernel is probed once, while the first training step is being
  # traced; the probe must run eagerly there (a worker thread) and succeed.
  import concurrent.futures

  @jax.jit
  def step(k):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      w = pool.submit(exact.probe_pallas, True).result()
    np.testing.assert_allclose(w / w.sum(), [0.9, 0.1], atol=1e-5)
    return k

  step(jnp.ones(2))


def _sub_jaxprs(value):
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _primitives(jaxpr, found):
  for eqn in jaxpr.eqns:
    found.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        _primitives(sub, found)
  return found


def test_kernel_uses_only_primitives_the_gpu_lowering_has():
  # The GPU kernel (Pallas on Triton) lowers element-wise ops, reductions
  # other than and/or, selects, iota and loops; no gathers, scatters, dynamic
  # indexing or argmin/argmax. A primitive outside that set only fails on a
  # GPU (where the solver then falls back to XLA): catch it here.
  k = jnp.asarray(gram(0, 8, 3, common=0.0))
  jaxpr = jax.make_jaxpr(lambda k: wolfe.core(
      k, jnp.ones(8, jnp.float32), jnp.float32(1e-7), jnp.float32(1e-7),
      jnp.int32(80), wolfe.cholesky_factor))(k)
  found = _primitives(jaxpr.jaxpr, set())
  forbidden = {'reduce_and', 'reduce_or', 'reduce_xor', 'argmin', 'argmax',
               'gather', 'scatter', 'scatter-add', 'dynamic_slice',
               'dynamic_update_slice', 'sort', 'cumsum', 'custom_linear_solve',
               'lu', 'triangular_solve'}
  assert not found & forbidden, found & forbidden
  assert 'while' in found


def test_kernel_numerics_reach_kkt_on_the_low_rank_family():
  # The kernel's own linear algebra (element-wise Cholesky), run under XLA on
  # the low-rank family of test_solvers: the GPU kernel computes exactly this.
  # At the largest m the kernel takes (above it, the solver runs under XLA
  # with LAPACK/cuSOLVER Cholesky, which test_solvers covers up to m = 256).
  m = exact.KERNEL_MAX_GROUPS
  from test_solvers import _family, _kkt64  # pylint: disable=g-import-not-at-top

  def solve(k):
    kn, valid, _ = solvers.normalize_gram(k)
    w, _ = wolfe.core(kn, valid.astype(jnp.float32), jnp.float32(1e-7),
                               jnp.float32(1e-7), 8 * m + 16,
                               wolfe.cholesky_factor)
    w = jnp.maximum(w, 0.0)
    return w / jnp.sum(w)

  grams = _family(m)
  w = jax.jit(jax.vmap(solve))(jnp.asarray(grams))
  assert np.max(_kkt64(grams, w)) <= 1e-6


# --- Derivatives (issue 26: jax.grad through the exact solver) ----------------


def _fd_grad(f, x, h=1e-3):
  """Central differences of a scalar ``f`` at ``x`` (one vmap; jit it)."""
  eye = jnp.eye(x.size, dtype=x.dtype).reshape((x.size,) + x.shape) * h
  values = jax.vmap(f)(jnp.concatenate([x + eye, x - eye]))
  return ((values[:x.size] - values[x.size:]) / (2 * h)).reshape(x.shape)


def _weights(g, **options):
  return grain_optax.min_norm_weights(g @ g.T, **options).weights


def _six_groups_in_four_dimensions():
  # 3 groups on the support, 3 at weight 0: the active set matters.
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
          jnp.asarray(rng.normal(size=(6,)), jnp.float32),
          jnp.asarray(rng.normal(size=(6, 4)), jnp.float32))


def test_weights_are_differentiable_on_the_active_set():
  # jax.grad used to fail with JAX's bare while_loop error; now the
  # derivative solves the KKT system of the support (implicit function
  # theorem), in forward and reverse mode.
  g, c, v = _six_groups_in_four_dimensions()
  f = lambda g: _weights(g) @ c

  @jax.jit
  def everything(g, v):
    return (_weights(g), jax.grad(f)(g), jax.jvp(_weights, (g,), (v,))[1],
            _fd_grad(f, g))

  w, grad, dw, fd = everything(g, v)
  assert 0 < int(jnp.sum(w > 0)) < 6
  np.testing.assert_allclose(grad, fd, atol=1e-4)
  # The tangent keeps the weights on the simplex and zero off the support.
  assert abs(float(jnp.sum(dw))) < 1e-6
  np.testing.assert_array_equal(dw[w == 0], 0.0)
  np.testing.assert_allclose(dw @ c, jnp.sum(grad * v), rtol=1e-4)


def _support_derivative_float64(g, c, support):
  """d(w . c)/dg in float64 by central differences of the closed form of the
  min-norm weights on a fixed support S: w_S = K_SS^-1 1 / (1' K_SS^-1 1)
  (valid near g when every weight of S is > 0 and the support is strict)."""
  g = np.asarray(g, np.float64)
  c = np.asarray(c, np.float64)[support]

  def f(g):
    k = (g @ g.T)[np.ix_(support, support)]
    u = np.linalg.solve(k, np.ones(len(support)))
    return (u / u.sum()) @ c

  out, h = np.zeros_like(g), 1e-6
  for i in np.ndindex(g.shape):
    e = np.zeros_like(g)
    e[i] = h
    out[i] = (f(g + e) - f(g - e)) / (2 * h)
  return out


def test_exact_and_projected_gradient_derivatives_agree():
  # Both solvers' derivatives against a float64 reference: the exact one by
  # the implicit function theorem (float32 accurate), the projected-gradient
  # one through its (converged, fixed-step) iterations, which float32
  # rounding along 2000 accelerated steps limits: 1.6e-6 from the reference
  # on the CPU; on an H100 (JAX 0.11.2) 2.4e-5 on the support and 3.5e-5 on
  # an off-support group's row, whose true derivative is 0 (7.6e-5 of the
  # largest entry), where the exact derivative stayed within 1e-6. A wrong
  # derivative is off by the entries' own size (~0.1).
  g, c, _ = _six_groups_in_four_dimensions()
  pg = dict(solver='projected_gradient', stepsize=0.1, tolerance=1e-9,
            max_iterations=2000)
  grads = jax.jit(lambda g: (jax.grad(lambda g: _weights(g) @ c)(g),
                             jax.grad(lambda g: _weights(g, **pg) @ c)(g),
                             _weights(g)))
  with jax.default_matmul_precision('highest'):  # the test's own g @ g.T
    exact_grad, pg_grad, w = grads(g)
  support = np.flatnonzero(np.asarray(w) > 0)
  assert 0 < len(support) < len(w)
  reference = _support_derivative_float64(g, c, support)
  np.testing.assert_allclose(exact_grad, reference, atol=1e-5)
  np.testing.assert_allclose(pg_grad, reference, rtol=1e-3,
                             atol=2e-4 * np.abs(reference).max())


def test_meta_gradient_through_a_grain_step_with_the_exact_solver():
  # The loss after one GRAIN + SGD step, differentiated in the params
  # (what a meta-learning or learned-optimizer loop does).
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  tx = optax.chain(grain_optax.grain(num_groups=4), optax.sgd(0.1))

  def after_one_step(w):
    _, g = grain_optax.group_value_and_grad(loss, 4)(w, (x, y))
    u, _ = tx.update(g, tx.init(w), w)
    return loss(w + u, (x, y))

  w = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  grad, fd = jax.jit(lambda w: (jax.grad(after_one_step)(w),
                                _fd_grad(after_one_step, w, h=3e-3)))(w)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)
