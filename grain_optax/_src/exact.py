"""Where the exact solver runs: XLA, or one Pallas kernel on CUDA GPUs.

:func:`solve` runs the algorithm of :mod:`wolfe` on the backend it is given:

* ``'auto'``: a Pallas kernel on CUDA GPUs where it compiles, runs and passes
  a check on a problem of known answer (once per process), XLA elsewhere;
* ``'xla'``: XLA, with Cholesky solves from LAPACK or cuSOLVER;
* ``'pallas_interpret'``: the GPU kernel interpreted, on any device (tests).

The backend is an explicit option (``min_norm_weights(exact_backend=...)``);
when it is None, :func:`default_backend` reads the environment variable
``GRAIN_OPTAX_EXACT_BACKEND`` (``'auto'``, the default, or ``'xla'``) at trace
time.

The weights are differentiable (forward and reverse mode) by the implicit
function theorem, not through the solver's loop: see :func:`weights_jvp`.
"""

import functools
import warnings
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from grain_optax._src import kernel_probe
from grain_optax._src import wolfe

Backend = Literal['auto', 'xla', 'pallas_interpret']
BACKENDS = ('auto', 'xla', 'pallas_interpret')
ENVIRONMENT_VARIABLE = 'GRAIN_OPTAX_EXACT_BACKEND'


def default_backend() -> Backend:
  """The backend named by ``GRAIN_OPTAX_EXACT_BACKEND`` (default ``'auto'``).

  The default of an ``exact_backend`` option left None.

  Raises:
    ValueError: if the variable names neither ``'auto'`` nor ``'xla'``.
  """
  return kernel_probe.environment_backend(ENVIRONMENT_VARIABLE,
                                          'a backend')


def resolve_backend(backend: Optional[str]) -> Backend:
  """``backend``, checked, or the environment's default when it is None."""
  if backend is None:
    return default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'grain_optax: unknown exact-solver backend {backend!r}; '
                     f'choose one of {BACKENDS}.')
  return backend


def _kernel(k_ref, v_ref, p_ref, w_ref, it_ref):
  """Pallas kernel: the whole exact solver on one padded [n, n] Gram."""
  params = p_ref[...]
  idx = jax.lax.broadcasted_iota(jnp.int32, params.shape, 0)
  tolerance = jnp.sum(jnp.where(idx == 0, params, 0.0))
  regularization = jnp.sum(jnp.where(idx == 1, params, 0.0))
  max_iterations = jnp.sum(jnp.where(idx == 2, params, 0.0)).astype(jnp.int32)
  w, iterations = wolfe.core(k_ref[...], v_ref[...], tolerance,
                             regularization, max_iterations,
                             wolfe.cholesky_factor)
  w_ref[...] = w
  it_ref[...] = jnp.full(it_ref.shape, iterations, jnp.int32)


def run_pallas(k: jax.Array, valid_f: jax.Array, tolerance: jax.Array,
               regularization: jax.Array, max_iterations: int,
               interpret: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Runs :func:`wolfe.core` in one Pallas kernel (one launch, no host sync)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = k.shape[0]
  n = max(16, 1 << (m - 1).bit_length())
  k_pad = jnp.zeros((n, n), jnp.float32).at[:m, :m].set(k)
  v_pad = jnp.zeros((n,), jnp.float32).at[:m].set(valid_f)
  params = jnp.zeros((16,), jnp.float32).at[0].set(tolerance).at[1].set(
      regularization).at[2].set(jnp.asarray(max_iterations, jnp.float32))
  w, it = pl.pallas_call(
      _kernel,
      out_shape=(jax.ShapeDtypeStruct((n,), jnp.float32),
                 jax.ShapeDtypeStruct((16,), jnp.int32)),
      interpret=interpret)(k_pad, v_pad, params)
  return w[:m], it[0]


def probe_pallas(interpret: bool = False) -> np.ndarray:
  """Builds and runs the kernel on a 2-group problem whose answer is known."""
  k = np.array([[1.0, 0.0], [0.0, 9.0]], np.float32)
  if not interpret:
    # This process's own GPU: with several processes (jax.distributed),
    # jax.devices()[0] belongs to process 0, and a probe that fails on the
    # other processes only would give them a different program than process
    # 0 (XLA instead of the kernel), whose collectives then never match.
    k = jax.device_put(k, jax.local_devices(backend='gpu')[0])
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    w, _ = jax.jit(lambda k: run_pallas(
        k, jnp.ones(2, jnp.float32), 1e-7, 1e-7, 32, interpret=interpret))(k)
    w = np.asarray(w)
  if not np.allclose(w / w.sum(), [0.9, 0.1], atol=1e-5):
    raise RuntimeError(f'the kernel returned {w}, expected [0.9, 0.1]')
  return w


# The kernel runs as one GPU program, so its n^3 factorisation is serial
# work: for larger m XLA's cuSOLVER path is faster (benchmarks/RESULTS.md,
# section 2, `benchmarks/qp_solvers.py`). Larger problems run under XLA.
KERNEL_MAX_GROUPS = 32


def solve(k: jax.Array, valid: jax.Array, tolerance: jax.typing.ArrayLike,
          max_iterations: jax.typing.ArrayLike,
          regularization: jax.typing.ArrayLike,
          backend: Backend) -> Tuple[jax.Array, jax.Array]:
  """The exact solver on a normalised Gram, on ``backend``.

  Differentiable in ``k`` and ``regularization`` (see :func:`weights_jvp`);
  the other arguments have zero derivative.

  Args:
    k: ``[m, m]`` normalised Gram (see :func:`solvers.normalize_gram`).
    valid: ``[m]`` bool, the groups that take part.
    tolerance: KKT tolerance for adding a group.
    max_iterations: cap on the linear solves.
    regularization: ridge added to the diagonal.
    backend: ``'auto'``, ``'xla'`` or ``'pallas_interpret'`` (see
      :data:`BACKENDS`).

  Returns:
    ``(weights, iterations)``: ``[m]`` float32 weights on the simplex (NaN if
    no group takes part) and the int32 number of linear solves.
  """
  return _solve(k, valid.astype(jnp.float32),
                jnp.asarray(tolerance, jnp.float32),
                jnp.asarray(regularization, jnp.float32),
                jnp.asarray(max_iterations, jnp.int32), backend)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _solve(k, valid_f, tolerance, regularization, max_iterations, backend):
  """:func:`solve` on float32 arrays, with the derivative of its result."""
  valid = valid_f > 0

  def on_xla(k, valid_f, tolerance, regularization):
    return wolfe.core(k, valid_f, tolerance, regularization, max_iterations,
                      wolfe.lapack_cholesky_factor)

  def on_pallas(k, valid_f, tolerance, regularization):
    try:
      return run_pallas(k, valid_f, tolerance, regularization,
                        max_iterations)
    except ValueError as e:
      # Pallas cannot type its outputs in this context (e.g. inside
      # ``jax.shard_map`` with ``check_vma=True`` on JAX versions whose
      # ShapeDtypeStruct needs the manual axes spelled out): same algorithm
      # under XLA instead, with a warning (a genuine bug shows there too).
      kernel_probe.fallback_warning("the exact solver's Pallas GPU kernel", e)
      return on_xla(k, valid_f, tolerance, regularization)

  args = (k, valid_f, tolerance, regularization)
  if backend == 'xla':
    w, iterations = on_xla(*args)
  elif backend == 'pallas_interpret':
    w, iterations = run_pallas(*args, max_iterations, interpret=True)
  elif (k.shape[0] <= KERNEL_MAX_GROUPS and kernel_probe.gpu_present()
        and kernel_probe.passes(
            probe_pallas, "the exact solver's Pallas GPU kernel",
            'The same algorithm runs under XLA instead (correct, with a few '
            'more microseconds per step).')):
    # platform_dependent picks the branch for the device the computation
    # lands on (a jit may target the CPU on a GPU host).
    w, iterations = jax.lax.platform_dependent(
        *args, cuda=on_pallas, default=on_xla)
  else:
    # No GPU at all: never trace the Pallas branch.
    w, iterations = on_xla(*args)
  # Identical groups (equal rows of K, bit for bit) get equal weights: the
  # average over each class of duplicates changes neither d nor K w.
  w = jnp.where(valid, jnp.maximum(w, 0.0), 0.0)
  w = jnp.where(valid, _average_duplicates(k, valid, w), 0.0)
  return w / jnp.sum(w), iterations


def _average_duplicates(k: jax.Array, valid: jax.Array,
                        w: jax.Array) -> jax.Array:
  """``w`` averaged over each class of identical groups (equal rows of K)."""
  same = ((k == jnp.diagonal(k)[:, None]) & (k == jnp.diagonal(k)[None, :])
          & valid[:, None] & valid[None, :])
  return jnp.dot(same.astype(jnp.float32), w,
                 precision=jax.lax.Precision.HIGHEST) / jnp.maximum(
      jnp.sum(same, axis=1), 1).astype(jnp.float32)


def weights_jvp(k: jax.Array, valid: jax.Array, w: jax.Array,
                regularization: jax.Array, dk: jax.Array,
                dregularization: jax.Array) -> jax.Array:
  r"""The derivative of the exact solver's weights (implicit function theorem).

  The solver minimises :math:`w^\top A w` over the simplex, with
  :math:`A = K + \epsilon I`. On the support :math:`S = \{i : w_i > 0\}`
  the optimum solves the linear system

  .. math::
    \begin{bmatrix} A_{SS} & 1 \\ 1^\top & 0 \end{bmatrix}
    \begin{bmatrix} w_S \\ -\lambda \end{bmatrix} =
    \begin{bmatrix} 0 \\ 1 \end{bmatrix},

  whose matrix is non-singular (:math:`A_{SS}` is positive definite for
  :math:`\epsilon > 0`). While the support does not change (strict
  complementarity, the generic case), differentiating it gives
  :math:`dw_S` from the same matrix with right-hand side
  :math:`[-dA_{SS}\, w_S;\ 0]`, and :math:`dw = 0` off the support. The
  result is linear in ``(dk, dregularization)``, so reverse mode transposes
  it (one solve with the same matrix); the solver's loop is never
  differentiated.

  Args:
    k: ``[m, m]`` normalised Gram.
    valid: ``[m]`` bool, the groups that take part.
    w: ``[m]`` the solver's weights.
    regularization: ``[]`` the ridge :math:`\epsilon`.
    dk: ``[m, m]`` tangent of ``k``.
    dregularization: ``[]`` tangent of the ridge.

  Returns:
    ``[m]`` float32 tangent of the weights, summing to 0.
  """
  m = k.shape[0]
  hi = jax.lax.Precision.HIGHEST
  on = valid & (w > 0)  # The support; empty for NaN weights.
  eye = jnp.eye(m, dtype=jnp.float32)
  pair = on[:, None] & on[None, :]
  a = jnp.where(pair, k + regularization * eye, eye)
  one = on.astype(jnp.float32)
  corner = jnp.where(jnp.any(on), 0.0, 1.0)  # No support: dw = 0.
  kkt = jnp.block([[a, one[:, None]], [one[None, :], corner[None, None]]])
  w_s = jnp.where(on, w, 0.0)
  da_w = jnp.dot(dk, w_s, precision=hi) + dregularization * w_s
  rhs = jnp.concatenate([jnp.where(on, -da_w, 0.0),
                         jnp.zeros([1], jnp.float32)])
  dw = jnp.linalg.solve(kkt, rhs)[:m]
  # As in the solver: identical groups share one weight.
  return jnp.where(on, _average_duplicates(k, valid, dw), 0.0).astype(
      jnp.float32)


@_solve.defjvp
def _solve_jvp(backend, primals, tangents):
  k, valid_f, tolerance, regularization, max_iterations = primals
  dk, _, _, dregularization, _ = tangents
  w, iterations = _solve(k, valid_f, tolerance, regularization,
                         max_iterations, backend)
  dw = weights_jvp(k, valid_f > 0, w, regularization, dk, dregularization)
  return (w, iterations), (dw, np.zeros(np.shape(iterations),
                                        jax.dtypes.float0))
