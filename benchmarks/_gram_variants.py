"""Experimental Gram-matrix implementations, to measure what the Gram costs.

Not used by the library. ``step_overhead.py --gram_times`` times each
(``--gram_accuracy`` compares their accuracy), as drop-ins for
``grain_optax.gram_matrix``:

* ``xla``: the library's Gram with its GPU kernel off (one XLA dot per
  leaf, contracted in place, as before the kernel);
* ``flat``: every leaf reshaped to ``[m, P]``, one ``HIGHEST`` contraction
  (XLA chooses the kernels, as for the library's in-place contraction);
* ``pallas``: a Pallas GPU kernel per large leaf (grid over column blocks,
  float32 products and sums, partial Grams summed by XLA); the small leaves
  (biases, LayerNorm) concatenated into one matrix first;
* ``pallasbf16``: the same kernel fed ``leaf.astype(bfloat16)`` for the
  large leaves. Where a per-group gradient was produced in bfloat16 (the
  weight gradients of bf16 matmuls) XLA folds the round trip and the kernel
  reads the bf16 buffer directly; where it was float32 this rounds the
  gradient to bf16 (about 3 significant digits): a floor for speed, not an
  exact Gram;
* ``bf16``: XLA's dot on the same bf16 casts, float32 accumulation;
* ``x6``: XLA's dot on the float32 leaves with the ``BF16_BF16_F32_X6``
  algorithm (six bf16 products, about float32 accuracy, tensor cores).
* ``acc``: a Pallas GPU kernel per leaf in the leaf's own dtype that keeps an
  ``[m, m, chunk]`` float32 accumulator of element-wise products and reduces
  it once at the end (the ``pallas`` kernel reduces every chunk); leaves
  whose size the block does not divide, and the small ones concatenated, as
  ``pallas``;
* ``mma``: a Pallas GPU kernel on tensor cores for 16-bit leaves: the leaf
  ``[m, P]`` seen as ``[16, 16 P / m]`` (a free reshape: row ``(i, q)`` is
  the ``q``-th of ``16 / m`` slices of group ``i``), each program summing
  ``x x^T`` over its columns in float32 (exact products of 16-bit numbers);
  the Gram is the sum over ``q`` of the diagonal blocks. Float32 leaves and
  leaves the block does not divide go through XLA's dot;
* ``ew``: XLA only: each leaf as ``[m, R, C]``, the products summed over
  ``C`` in one fusion (``[m, m, R]`` partials), then over ``R``.

``gram_accuracy`` reports each variant's error against the library's Gram on
real per-group gradients.
"""

import functools

import jax
import jax.numpy as jnp

VARIANTS = ('xla', 'flat', 'pallas', 'pallasbf16', 'bf16', 'x6', 'acc', 'ew', 'mma')


def _chunk(m):
  c = 4096 // (m * m)
  return int(min(512, max(16, 1 << max(c.bit_length() - 1, 0))))


def _gram_kernel(x_ref, o_ref, *, span, m, chunk):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def body(c, acc):
    x = x_ref[:, pl.ds(pl.multiple_of(c * chunk, chunk), chunk)].astype(
        jnp.float32)
    return acc + jnp.sum(x[:, None, :] * x[None, :, :], axis=2)

  acc = jax.lax.fori_loop(0, span // chunk, body,
                          jnp.zeros((m, m), jnp.float32))
  o_ref[...] = acc[None]


def pallas_gram2d(x, interpret=False):
  """``x x^T`` in float32 for ``x`` of shape ``[m, P]`` (any float dtype)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m, p = x.shape
  chunk = _chunk(m)
  if p % chunk:
    x = jnp.pad(x, ((0, 0), (0, chunk - p % chunk)))
    p = x.shape[1]
  span = chunk
  while span < 16384 and p % (2 * span) == 0 and p // (2 * span) >= 264:
    span *= 2
  grid = p // span
  out = pl.pallas_call(
      functools.partial(_gram_kernel, span=span, m=m, chunk=chunk),
      out_shape=jax.ShapeDtypeStruct((grid, m, m), jnp.float32),
      grid=(grid,),
      in_specs=[pl.BlockSpec((m, span), lambda i: (0, i))],
      out_specs=pl.BlockSpec((1, m, m), lambda i: (i, 0, 0)),
      interpret=interpret)(x)
  return jnp.sum(out, axis=0)


def _acc_kernel(x_ref, o_ref, *, steps, chunk):
  def body(c, acc):
    x = x_ref[:, pl_ds(c * chunk, chunk)].astype(jnp.float32)
    return acc + x[:, None, :] * x[None, :, :]

  m = x_ref.shape[0]
  acc = jax.lax.fori_loop(0, steps, body,
                          jnp.zeros((m, m, chunk), jnp.float32))
  o_ref[...] = jnp.sum(acc, axis=2)[None]


def pl_ds(start, size):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  return pl.ds(pl.multiple_of(start, size), size)


def acc_gram2d(x, interpret=False, span=4096):
  """``x x^T`` (float32) of ``[m, P]`` ``x`` by the ``acc`` kernel, or None."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m, p = x.shape
  chunk = max(16, 4096 // (m * m))
  chunk = 1 << (chunk.bit_length() - 1)
  if p % span or span % chunk:
    return None
  out = pl.pallas_call(
      functools.partial(_acc_kernel, steps=span // chunk, chunk=chunk),
      out_shape=jax.ShapeDtypeStruct((p // span, m, m), jnp.float32),
      grid=(p // span,),
      in_specs=[pl.BlockSpec((m, span), lambda i: (0, i))],
      out_specs=pl.BlockSpec((1, m, m), lambda i: (i, 0, 0)),
      interpret=interpret)(x)
  return jnp.sum(out, axis=0)


def _mma_kernel(x_ref, o_ref, *, steps, chunk):
  def body(c, acc):
    x = x_ref[:, pl_ds(c * chunk, chunk)]
    return acc + jax.lax.dot_general(
        x, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  rows = x_ref.shape[0]
  o_ref[...] = jax.lax.fori_loop(
      0, steps, body, jnp.zeros((rows, rows), jnp.float32))[None]


def mma_gram2d(x, interpret=False, rows=16, chunk=128, num_warps=4):
  """``x x^T`` (float32) of 16-bit ``[m, P]`` ``x`` on tensor cores, or None."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  m, p = x.shape
  if x.dtype.itemsize != 2 or rows % m or p % (rows // m):
    return None
  s = rows // m
  q = p // s
  span = 8192
  while span > 256 and (q % span or q // span < 512):
    span //= 2
  if q % span or span % chunk:
    return None
  out = pl.pallas_call(
      functools.partial(_mma_kernel, steps=span // chunk, chunk=chunk),
      out_shape=jax.ShapeDtypeStruct((q // span, rows, rows), jnp.float32),
      grid=(q // span,),
      in_specs=[pl.BlockSpec((rows, span), lambda i: (0, i))],
      out_specs=pl.BlockSpec((1, rows, rows), lambda i: (i, 0, 0)),
      compiler_params=None if interpret else plt.CompilerParams(
          num_warps=num_warps, num_stages=3),
      interpret=interpret)(x.reshape(rows, q))
  full = jnp.sum(out, axis=0).reshape(m, s, m, s)
  return jnp.trace(full, axis1=1, axis2=3)


def ew_gram2d(x, c=1024):
  """``x x^T`` (float32) by XLA: products summed over blocks of ``c``."""
  m, p = x.shape
  while p % c:
    c //= 2
  x = x.reshape(m, p // c, c).astype(jnp.float32)
  return jnp.sum(jnp.sum(x[:, None] * x[None, :], axis=3), axis=2)


def _xla_gram2d(x):
  return jax.lax.dot_general(
      x, x, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)


def make_gram(variant, interpret=False, small=1 << 16):
  """A drop-in ``gram_matrix(per_group, **kwargs)`` for ``variant``."""
  if variant not in VARIANTS:
    raise ValueError(variant)

  def gram(per_group, **kwargs):
    del kwargs
    leaves = jax.tree_util.tree_leaves(per_group)
    if variant == 'xla':
      from grain_optax._src import gram as gram_lib  # pylint: disable=g-import-not-at-top
      return gram_lib.xla_gram(*leaves)
    m = leaves[0].shape[0]
    flat = [x.reshape(m, -1) for x in leaves]
    if variant == 'flat':
      return sum(_xla_gram2d(x) for x in flat)
    if variant == 'ew':
      return sum(ew_gram2d(x) for x in flat)
    if variant == 'mma':
      parts = []
      for x in flat:
        k = mma_gram2d(x, interpret) if x.shape[1] >= small else None
        parts.append(_xla_gram2d(x) if k is None else k)
      return sum(parts[1:], parts[0])
    if variant == 'acc':
      parts, rest = [], []
      for x in flat:
        k = acc_gram2d(x, interpret) if x.shape[1] >= small else None
        if k is None:
          rest.append(x.astype(jnp.float32))
        else:
          parts.append(k)
      if rest:
        parts.append(pallas_gram2d(jnp.concatenate(rest, axis=1), interpret))
      return sum(parts[1:], parts[0])
    if variant == 'x6':
      return sum(jax.lax.dot_general(
          x, x, (((1,), (1,)), ((), ())),
          precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
          preferred_element_type=jnp.float32) for x in flat)
    big = [x for x in flat if x.shape[1] >= small]
    tiny = [x.astype(jnp.float32) for x in flat if x.shape[1] < small]
    parts = []
    for x in big:
      if variant == 'pallas':
        parts.append(pallas_gram2d(x, interpret))
      elif variant == 'pallasbf16':
        parts.append(pallas_gram2d(x.astype(jnp.bfloat16), interpret))
      else:
        xb = x.astype(jnp.bfloat16)
        parts.append(jax.lax.dot_general(
            xb, xb, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32))
    if tiny:
      x = jnp.concatenate(tiny, axis=1)
      parts.append(_xla_gram2d(x) if variant == 'bf16'
                   else pallas_gram2d(x, interpret))
    return sum(parts[1:], parts[0])

  return gram


def gram_accuracy(per_group, interpret=False):
  """Relative error of each variant's Gram and of its weights' KKT residual.

  Against ``grain_optax.gram_matrix`` (float32, HIGHEST): ``gram_err`` is
  max |K_v - K| / max diag K; ``kkt`` is the KKT residual of the weights
  solved from K_v, evaluated on K (the guarantee the user gets).
  """
  import grain_optax  # pylint: disable=g-import-not-at-top
  ref = jax.jit(grain_optax.gram_matrix)(per_group)
  scale = jnp.max(jnp.diagonal(ref))
  out = {}
  for variant in VARIANTS:
    try:
      k = jax.jit(make_gram(variant, interpret))(per_group)
    except Exception as e:  # pylint: disable=broad-except
      out[variant] = {'error': f'{type(e).__name__}: {e}'[:200]}
      continue
    w = grain_optax.min_norm_weights(k).weights
    out[variant] = {
        'gram_err': float(jnp.max(jnp.abs(k - ref)) / scale),
        'kkt_on_reference': float(grain_optax.kkt_residual(ref, w))}
  w = grain_optax.min_norm_weights(ref).weights
  out['reference'] = {'gram_err': 0.0,
                      'kkt_on_reference': float(grain_optax.kkt_residual(ref, w))}
  return out
