"""The Gram matrix of large leaves as Pallas GPU kernels (tensor cores).

XLA compiles the Gram of one ``[m, P]`` leaf (``m`` a few groups, ``P``
millions of parameters) into batched ``[m, C] @ [C, m]`` products whose
kernels read the gradients at a fraction of the memory bandwidth: on an H100
the Gram of the 91.5 M-parameter GPT of ``benchmarks/_gpt.py`` took 1.6 ms at
m = 4, where reading the gradients once takes about 0.25 ms
(benchmarks/RESULTS.md, section 1d).

The kernel here reads each leaf once, as a free reshape to ``[r, r P / m]``
with ``r = max(16, m)`` rows (row ``(i, q)`` holds the ``q``-th of ``r / m``
consecutive slices of group ``i``); each program sums ``x x^T`` over its
columns on tensor cores with float32 accumulation, and

.. math::
  K_{ij} = \\sum_q \\big(\\textstyle\\sum_{\\text{programs}} x x^\\top
  \\big)_{(i, q), (j, q)}.

Products of 16-bit numbers are exact in float32, so a bfloat16 or float16
leaf's Gram is as exact as XLA's float32 one; only the order of the float32
sums differs. Float32 leaves stay with XLA's dot.

Where the kernel runs: CUDA GPUs, one device (``jax.device_count() == 1``; a
sharded leaf would be gathered to feed a kernel the partitioner cannot
split), ``m`` a power of two up to 64, and leaves of at least ``SMALL``
entries per group (see :func:`supported`); every other leaf, and every other
platform, goes through XLA's dot. The kernel is
built and checked once per process on a problem of known answer; where the
check fails (Pallas' GPU backends change between JAX releases) XLA is used,
with a warning. ``GRAIN_OPTAX_GRAM_BACKEND=xla`` turns the kernel off.
"""

import concurrent.futures
import functools
import os
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ENVIRONMENT_VARIABLE = 'GRAIN_OPTAX_GRAM_BACKEND'

# Columns each loop step of a program multiplies, and the largest and
# smallest columns one program covers: tuned on an H100 (benchmarks/
# step_overhead.py --gram_times).
CHUNK = 128
MAX_SPAN = 8192
MIN_SPAN = 256
# Programs wanted per launch (a few per streaming multiprocessor).
MIN_PROGRAMS = 512
NUM_WARPS = 2
NUM_STAGES = 3
# Leaves with fewer entries per group than this are concatenated into one
# float32 matrix and take one XLA dot (a kernel launch each would cost more
# than they hold).
SMALL = 1 << 16


def backend_from_environment() -> str:
  """``'auto'`` (default) or ``'xla'``, from ``GRAIN_OPTAX_GRAM_BACKEND``.

  Raises:
    ValueError: if the variable names neither.
  """
  name = os.environ.get(ENVIRONMENT_VARIABLE, 'auto').strip().lower()
  if name not in ('auto', 'xla'):
    raise ValueError(
        f'grain_optax: {ENVIRONMENT_VARIABLE}={name!r} is not a Gram backend; '
        "use 'auto' (the default) or 'xla'.")
  return name


def _rows(m: int) -> Optional[int]:
  if m < 1 or m > 64 or m & (m - 1):
    return None
  return max(16, m)


def _span(q: int) -> int:
  """Columns per program: the largest power of two from ``MIN_SPAN`` to
  ``MAX_SPAN`` that still gives ``MIN_PROGRAMS`` programs (if any)."""
  span = MAX_SPAN
  while span > MIN_SPAN and q // span < MIN_PROGRAMS:
    span //= 2
  return span


def supported(shape, dtype) -> bool:
  """Whether the kernel takes a ``[m, *param_shape]`` leaf of ``dtype``.

  ``m`` must be a power of two up to 64, the dtype bfloat16 or float16 (a
  float32 leaf in the kernel's IEEE float32 dot measured slower than XLA's
  on an H100), a group's slice at least ``SMALL`` entries, and (for ``m < 16``)
  divisible into ``16 / m`` equal parts.
  """
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or (
      len(shape) < 1):
    return False
  m = shape[0]
  r = _rows(m)
  p = int(np.prod(shape[1:], dtype=np.int64))
  return (r is not None and p >= SMALL and p % (r // m) == 0
          and p * m // r >= MIN_SPAN)


def _kernel(x_ref, o_ref, *, steps: int, chunk: int):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def body(c, acc):
    x = x_ref[:, pl.ds(pl.multiple_of(c * chunk, chunk), chunk)]
    return acc + jax.lax.dot_general(
        x, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  rows = x_ref.shape[0]
  o_ref[...] = jax.lax.fori_loop(
      0, steps, body, jnp.zeros((rows, rows), jnp.float32))[None]


def leaf_partials(x: jax.Array, interpret: bool = False) -> jax.Array:
  """``[n, r, r]`` float32 partial sums of one supported leaf's Gram.

  The leaf is viewed as ``[r, q]``; each of the kernel's programs sums
  ``x x^T`` over its ``span`` columns, and the columns the programs do not
  cover (fewer than ``span``) take one XLA dot, the last partial sum. Their
  sum over the first axis, passed to :func:`finish`, is the Gram.

  Args:
    x: a ``[m, ...]`` leaf for which :func:`supported` holds.
    interpret: run the kernel in Pallas' interpreter (any device; tests).
  """
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  r = _rows(x.shape[0])
  q = x.size // r
  span = _span(q)
  chunk = min(CHUNK, span)
  programs = q // span
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    kwargs['compiler_params'] = pl_triton.CompilerParams(
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
  view = x.reshape(r, q)
  partials = pl.pallas_call(
      functools.partial(_kernel, steps=span // chunk, chunk=chunk),
      out_shape=jax.ShapeDtypeStruct((programs, r, r), jnp.float32),
      grid=(programs,),
      in_specs=[pl.BlockSpec((r, span), lambda i: (0, i))],
      out_specs=pl.BlockSpec((1, r, r), lambda i: (i, 0, 0)),
      interpret=interpret, **kwargs)(view)
  if programs * span == q:
    return partials
  tail = view[:, programs * span:]
  rest = jax.lax.dot_general(
      tail, tail, (((1,), (1,)), ((), ())),
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return jnp.concatenate([partials, rest[None]], axis=0)


def finish(summed: jax.Array, m: int) -> jax.Array:
  """The ``[m, m]`` Gram from the ``[r, r]`` sum of :func:`leaf_partials`."""
  s = summed.shape[0] // m
  return jnp.trace(summed.reshape(m, s, m, s), axis1=1, axis2=3)


def leaf_gram(x: jax.Array, interpret: bool = False) -> jax.Array:
  """The ``[m, m]`` float32 Gram of one supported ``[m, ...]`` leaf."""
  return finish(jnp.sum(leaf_partials(x, interpret), axis=0), x.shape[0])


def probe(interpret: bool = False) -> None:
  """Runs the kernel on leaves of known Gram; raises if it is wrong."""
  m, p = 4, 1 << 17
  pattern = (np.arange(p) % 7 - 3).astype(np.float32)
  x = np.stack([pattern * (i + 1) for i in range(m)])
  want = np.outer(np.arange(1, m + 1), np.arange(1, m + 1)) * float(
      pattern @ pattern)
  for dtype in (jnp.bfloat16, jnp.float16):
    leaf = jnp.asarray(x, dtype)
    if not interpret:
      leaf = jax.device_put(leaf, jax.local_devices(backend='gpu')[0])
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      got = np.asarray(jax.jit(functools.partial(
          leaf_gram, interpret=interpret))(leaf))
    if not np.allclose(got, want, rtol=1e-6):
      raise RuntimeError(f'the Gram kernel returned {got}, expected {want}')


@functools.lru_cache(maxsize=None)
def _usable() -> bool:
  """Whether the kernel compiles, runs and is right on this GPU (once)."""
  try:
    # A worker thread: this runs while a step is being traced, and tracing
    # contexts are per thread, so the probe runs eagerly there.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pool.submit(probe).result()
    return True
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
        'grain_optax: the Gram matrix\'s Pallas GPU kernel is unavailable on '
        f'this JAX ({jax.__version__}): {type(e).__name__}: {e}. XLA computes '
        'the Gram instead (the same matrix, more slowly).', RuntimeWarning,
        stacklevel=2)
    return False


@functools.lru_cache(maxsize=None)
def _one_gpu() -> bool:
  try:
    return jax.device_count() == 1 and bool(jax.devices('gpu'))
  except RuntimeError:
    return False


def enabled() -> bool:
  """Whether Gram matrices traced now may use the kernel (see module doc)."""
  return (backend_from_environment() == 'auto' and _one_gpu()
          and _usable())
