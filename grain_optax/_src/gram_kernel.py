"""The Gram matrix of large leaves as Pallas GPU kernels (tensor cores).

XLA compiles the Gram of one ``[m, P]`` leaf (``m`` a few groups, ``P``
millions of parameters) into batched ``[m, C] @ [C, m]`` products whose
kernels read the gradients at a fraction of the memory bandwidth (measured on
the GPT of ``benchmarks/_gpt.py``: benchmarks/RESULTS.md, section 1d).

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
split), ``m`` a power of two up to 64, and leaves of at least
``KernelConfig.small`` entries per group (see :func:`supported`); every other
leaf, and every other platform, goes through XLA's dot. The kernel is built
and checked once per process on a problem of known answer; where the
check fails (Pallas' GPU backends change between JAX releases) XLA is used,
with a warning. The backend is the option ``SolverOptions.gram_backend``
(``'auto'`` or ``'xla'``); when it is None, the environment variable
``GRAIN_OPTAX_GRAM_BACKEND`` gives the default (``'auto'`` when unset).

The kernel's tuning (block sizes, warps, pipeline stages) is a frozen
:class:`KernelConfig` passed down the calls; :data:`DEFAULT` holds the values
the library uses.
"""

import dataclasses
import functools
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grain_optax._src import kernel_probe

ENVIRONMENT_VARIABLE = 'GRAIN_OPTAX_GRAM_BACKEND'


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """The Gram kernel's tuning, one immutable (hashable) value.

  The defaults come from a sweep (``benchmarks/step_overhead.py
  --gram_tune``; benchmarks/RESULTS.md, section 1d).

  Attributes:
    chunk: columns each loop step of a program multiplies.
    max_span: the most columns one program covers.
    min_span: the fewest columns one program covers.
    min_programs: programs wanted per launch (a few per streaming
      multiprocessor).
    num_warps: Triton warps per program.
    num_stages: Triton pipeline stages.
    leaves_per_launch: leaves one launch covers at most (a branch each in
      the kernel, and its compile time grows with them).
    small: leaves with fewer entries per group than this are concatenated
      into one float32 matrix and take one XLA dot (a kernel launch each
      would cost more than they hold).
    small_block: columns of that matrix per product of the dot's batch: the
      ``[m, P]`` matrix is cut into ``P / small_block`` blocks whose Grams
      are summed, so that the dot runs on many GPU blocks (one ``[m, P]``
      product with ``P`` in the hundreds of thousands runs on a few: the
      measurements are in benchmarks/RESULTS.md, "Short steps").
  """
  chunk: int = 128
  max_span: int = 8192
  min_span: int = 256
  min_programs: int = 512
  num_warps: int = 2
  num_stages: int = 3
  leaves_per_launch: int = 64
  small: int = 1 << 16
  small_block: int = 2048

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      lowest, kind = (0, 'non-negative') if field.name == 'small' else (
          1, 'positive')
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
          or value < lowest):
        raise ValueError(f'KernelConfig.{field.name} must be a {kind} '
                         f'integer, got {value!r}.')
    for name in ('chunk', 'max_span', 'min_span', 'num_warps'):
      value = getattr(self, name)
      if value & (value - 1):
        raise ValueError(
            f'KernelConfig.{name} must be a power of two, got {value}.')
    if self.min_span > self.max_span:
      raise ValueError(
          f'KernelConfig.min_span ({self.min_span}) is above max_span '
          f'({self.max_span}).')


DEFAULT = KernelConfig()


def backend_from_environment() -> str:
  """``'auto'`` (default) or ``'xla'``, from ``GRAIN_OPTAX_GRAM_BACKEND``.

  The default of a ``gram_backend`` option left None.

  Raises:
    ValueError: if the variable names neither.
  """
  return kernel_probe.environment_backend(ENVIRONMENT_VARIABLE,
                                          'a Gram backend')


def _rows(m: int) -> Optional[int]:
  if m < 1 or m > 64 or m & (m - 1):
    return None
  return max(16, m)


def _span(q: int, config: KernelConfig) -> int:
  """Columns per program: the largest power of two from ``min_span`` to
  ``max_span`` that still gives ``min_programs`` programs (if any)."""
  span = config.max_span
  while span > config.min_span and q // span < config.min_programs:
    span //= 2
  return span


def supported(shape, dtype, config: KernelConfig = DEFAULT) -> bool:
  """Whether the kernel takes a ``[m, *param_shape]`` leaf of ``dtype``.

  ``m`` must be a power of two up to 64, the dtype bfloat16 or float16 (a
  float32 leaf in the kernel's IEEE float32 dot measured slower than XLA's;
  benchmarks/RESULTS.md, section 1d), a group's slice at least
  ``config.small`` entries, and (for ``m < 16``) divisible into ``16 / m``
  equal parts.
  """
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or (
      len(shape) < 1):
    return False
  m = shape[0]
  r = _rows(m)
  p = int(np.prod(shape[1:], dtype=np.int64))
  return (r is not None and p >= config.small and p % (r // m) == 0
          and p * m // r >= config.min_span)


def small(shape, dtype, config: KernelConfig = DEFAULT) -> bool:
  """Whether a ``[m, *param_shape]`` leaf joins the concatenated small
  leaves (fewer than ``config.small`` entries per group, at most 32 bits,
  not taken by the kernel)."""
  return (not supported(shape, dtype, config) and len(shape) >= 1
          and int(np.prod(shape[1:], dtype=np.int64)) < config.small
          and jnp.dtype(dtype).itemsize <= 4)


def _kernel(*refs, plan):
  """Program ``i`` sums ``x x^T`` over one block of the leaf it falls in."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  *x_refs, o_ref = refs
  pid = pl.program_id(0)
  r = o_ref.shape[1]
  for x_ref, (start, count, steps, chunk) in zip(x_refs, plan):

    @pl.when((pid >= start) & (pid < start + count))
    def _(x_ref=x_ref, steps=steps, chunk=chunk):
      def body(c, acc):
        x = x_ref[:, pl.ds(pl.multiple_of(c * chunk, chunk), chunk)]
        return acc + jax.lax.dot_general(
            x, x, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32)

      o_ref[...] = jax.lax.fori_loop(
          0, steps, body, jnp.zeros((r, r), jnp.float32))[None]


def partials(leaves: Sequence[jax.Array], interpret: bool = False,
             config: KernelConfig = DEFAULT) -> jax.Array:
  """``[n, r, r]`` float32 partial sums of supported leaves' Gram.

  One kernel launch covers every leaf (a launch per leaf left the GPU idle
  between them): each leaf is viewed as ``[r, q]`` and cut into blocks of
  ``span`` columns, one program per block, each summing ``x x^T`` over its
  block. The columns past a leaf's last whole block (fewer than ``span``)
  take one XLA dot, one more partial sum. Their sum over the first axis,
  passed to :func:`finish`, is the Gram.

  Args:
    leaves: ``[m, ...]`` leaves (one ``m``) for which :func:`supported` holds.
    interpret: run the kernel in Pallas' interpreter (any device; tests).
    config: the kernel's tuning.
  """
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  r = _rows(leaves[0].shape[0])
  views, plan, specs, tails = [], [], [], []
  start = 0
  for x in leaves:
    q = x.size // r
    span = _span(q, config)
    chunk = min(config.chunk, span)
    count = q // span
    view = x.reshape(r, q)
    views.append(view)
    plan.append((start, count, span // chunk, chunk))
    specs.append(pl.BlockSpec(
        (r, span),
        lambda i, start=start, count=count: (
            0, jnp.clip(i - start, 0, count - 1))))
    if count * span < q:
      tails.append(view[:, count * span:])
    start += count
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    kwargs['compiler_params'] = pl_triton.CompilerParams(
        num_warps=config.num_warps, num_stages=config.num_stages)
  out = [pl.pallas_call(
      functools.partial(_kernel, plan=tuple(plan)),
      out_shape=jax.ShapeDtypeStruct((start, r, r), jnp.float32),
      grid=(start,),
      in_specs=specs,
      out_specs=pl.BlockSpec((1, r, r), lambda i: (i, 0, 0)),
      interpret=interpret, **kwargs)(*views)]
  for tail in tails:
    out.append(jax.lax.dot_general(
        tail, tail, (((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32)[None])
  return out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)


def finish(summed: jax.Array, m: int) -> jax.Array:
  """The ``[m, m]`` Gram from the ``[r, r]`` sum of :func:`partials`."""
  s = summed.shape[0] // m
  return jnp.trace(summed.reshape(m, s, m, s), axis1=1, axis2=3)


def probe(interpret: bool = False) -> None:
  """Runs the kernel on leaves of known Gram; raises if it is wrong.

  Two leaves of different dtypes and sizes in one launch, one of them with
  columns past its last whole block.
  """
  m = 4
  sizes = (1 << 17, (1 << 16) + 4 * 100)
  xs, want = [], 0.0
  for p in sizes:
    pattern = (np.arange(p) % 7 - 3).astype(np.float32)
    xs.append(np.stack([pattern * (i + 1) for i in range(m)]))
    want = want + np.outer(np.arange(1, m + 1), np.arange(1, m + 1)) * float(
        pattern @ pattern)
  leaves = [jnp.asarray(xs[0], jnp.bfloat16), jnp.asarray(xs[1], jnp.float16)]
  if not interpret:
    gpu = jax.local_devices(backend='gpu')[0]
    leaves = [jax.device_put(x, gpu) for x in leaves]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    got = np.asarray(jax.jit(lambda t: finish(
        jnp.sum(partials(t, interpret), axis=0), m))(leaves))
  if not np.allclose(got, want, rtol=1e-6):
    raise RuntimeError(f'the Gram kernel returned {got}, expected {want}')


@functools.lru_cache(maxsize=None)
def _one_device() -> bool:
  return jax.device_count() == 1


def enabled() -> bool:
  """Whether the kernel can run here: one CUDA GPU where the probe passes.

  The backend option (``'auto'`` or ``'xla'``, resolved by the caller) is
  not read here.
  """
  return (_one_device() and kernel_probe.gpu_present()
          and kernel_probe.passes(
              probe, "the Gram matrix's Pallas GPU kernel",
              'XLA computes the Gram instead (the same matrix, more slowly).'))
