"""The Gram matrix's GPU kernel: same matrix as a float64 reference.

On a CPU the kernel runs in Pallas' interpreter; on a CUDA GPU (one device)
the last test checks the compiled kernel inside ``gram_matrix``.
"""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grain_optax
from grain_optax._src import gram
from grain_optax._src import gram_kernel


# The size below which leaves skip the kernel is a speed threshold; lower it
# so that the interpreted kernel runs on small arrays.
SMALL_LEAVES = dataclasses.replace(gram_kernel.DEFAULT, small=1024)


def _leaf_gram(x, config=SMALL_LEAVES):
  """The kernel's ``[m, m]`` Gram of one leaf, interpreted."""
  summed = jnp.sum(gram_kernel.partials([x], True, config), axis=0)
  return gram_kernel.finish(summed, x.shape[0])


def _reference(leaves):
  m = leaves[0].shape[0]
  flat = np.concatenate([np.asarray(x.astype(jnp.float32), np.float64)
                         .reshape(m, -1) for x in leaves], axis=1)
  return flat @ flat.T


@pytest.mark.parametrize('m', [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_kernel_gram_of_one_leaf(m, dtype):
  rng = np.random.default_rng(m)
  # Gradients of very different sizes per group: the relative error is
  # measured against the largest entry, as the solver sees it.
  scale = np.logspace(-3, 3, m)[:, None, None]
  x = jnp.asarray(rng.standard_normal((m, 16, 512)) * scale, dtype)
  assert gram_kernel.supported(x.shape, x.dtype, SMALL_LEAVES)
  assert not gram_kernel.supported(x.shape, x.dtype)  # the default: small
  k = _leaf_gram(x)
  assert k.dtype == jnp.float32 and k.shape == (m, m)
  ref = _reference([x])
  # 16-bit products are exact in float32; only float32 sums are rounded.
  np.testing.assert_allclose(k, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
  np.testing.assert_array_equal(k, k.T)


def test_supported_shapes():
  ok = gram_kernel.supported
  assert ok((4, 768, 3072), jnp.bfloat16)
  assert ok((8, 8192, 768), jnp.float16)
  assert not ok((8, 8192, 768), jnp.float32)  # XLA's dot is faster
  assert not ok((3, 768, 3072), jnp.bfloat16)  # m not a power of two
  assert not ok((128, 768, 3072), jnp.bfloat16)  # m above 64
  assert ok((4, 30522, 384), jnp.bfloat16)  # columns left over: one XLA dot
  assert not ok((4, 767, 3071), jnp.bfloat16)  # not 4 equal parts per group
  assert not ok((4, 3072), jnp.bfloat16)  # small: concatenated instead
  assert not ok((4, 768, 3072), jnp.float64)
  assert not ok((4,), jnp.float32)


def test_kernel_config_is_a_frozen_value_passed_down():
  with pytest.raises(dataclasses.FrozenInstanceError):
    gram_kernel.DEFAULT.chunk = 64  # pytype: disable=annotation-type-mismatch
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 16, 512)), jnp.bfloat16)
  ref = _reference([x])
  # Other tunings cut the same leaf into other blocks: the same Gram.
  for config in (dataclasses.replace(SMALL_LEAVES, chunk=64, max_span=512),
                 dataclasses.replace(SMALL_LEAVES, min_programs=1,
                                     max_span=1024)):
    np.testing.assert_allclose(_leaf_gram(x, config), ref, rtol=2e-6,
                               atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize('change, says', [
    ({'chunk': 0}, 'chunk must be a positive integer'),
    ({'num_stages': 2.5}, 'num_stages must be a positive integer'),
    ({'small': -1}, 'small must be a non-negative integer'),
    ({'max_span': 3000}, 'max_span must be a power of two'),
    ({'num_warps': 3}, 'num_warps must be a power of two'),
    ({'min_span': 16384}, 'min_span (16384) is above max_span (8192)'),
])
def test_kernel_config_rejects_a_tuning_the_kernel_cannot_run(change, says):
  with pytest.raises(ValueError, match=re.escape(says)):
    dataclasses.replace(gram_kernel.DEFAULT, **change)


def test_kernel_gram_of_a_mixed_tree_and_its_derivative():
  rng = np.random.default_rng(0)
  leaves = (
      jnp.asarray(rng.standard_normal((4, 32, 128)), jnp.bfloat16),  # kernel
      jnp.asarray(rng.standard_normal((4, 16, 256)), jnp.float16),  # kernel
      jnp.asarray(rng.standard_normal((4, 16, 256)), jnp.float32),  # XLA
      jnp.asarray(rng.standard_normal((4, 300)), jnp.float32),  # small
      jnp.asarray(rng.standard_normal((4, 17)), jnp.bfloat16),  # small
      jnp.asarray(rng.standard_normal((4, 7, 1101)), jnp.float32),  # XLA
      jnp.asarray(rng.standard_normal((4, 4, 1999)), jnp.bfloat16),  # + tail
  )
  k = gram.kernel_gram(leaves, True, SMALL_LEAVES)
  ref = _reference(leaves)
  np.testing.assert_allclose(k, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
  one_per_launch = dataclasses.replace(SMALL_LEAVES, leaves_per_launch=1)
  np.testing.assert_allclose(gram.kernel_gram(leaves, True, one_per_launch),
                             k, rtol=1e-6)

  # d/ds K(s x) = 2 s K(x): the tangent rule, under jit and vmap.
  def f(s, leaves):
    return gram.kernel_gram(tuple(x * s for x in leaves), True, SMALL_LEAVES)

  dk = jax.jit(jax.jacfwd(f))(jnp.float32(1.0), leaves)
  np.testing.assert_allclose(dk, 2 * ref, rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())
  stacked = tuple(jnp.stack([x, 2 * x]) for x in leaves)
  batched = jax.vmap(lambda t: gram.kernel_gram(t, True, SMALL_LEAVES))(
      stacked)
  np.testing.assert_allclose(batched[1], 4 * batched[0], rtol=1e-6)


@pytest.mark.parametrize('p', [1, 63, 64, 65, 1000])
@pytest.mark.parametrize('m', [1, 4, 16])
def test_blocked_gram_is_the_gram(m, p):
  # The small leaves' matrix, cut into blocks of 64 columns (the last one
  # padded with zeros): the same Gram as one dot, symmetric, float32.
  rng = np.random.default_rng(p)
  x = jnp.asarray(rng.standard_normal((m, p)) *
                  np.logspace(-2, 2, m)[:, None], jnp.float32)
  k = gram.blocked_gram(x, 64)
  ref = _reference([x])
  assert k.dtype == jnp.float32 and k.shape == (m, m)
  np.testing.assert_allclose(k, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
  np.testing.assert_array_equal(k, k.T)


def test_small_leaves_are_those_the_kernel_leaves_out():
  small = gram_kernel.small
  assert small((4, 3072), jnp.float32)  # LoRA factors, biases, norm scales
  assert small((4, 8, 384), jnp.bfloat16)
  assert not small((4, 768, 3072), jnp.bfloat16)  # the kernel's
  assert not small((4, 768, 3072), jnp.float32)  # large: XLA's dot alone
  assert not small((4, 16), jnp.float64)  # no float32 copy of float64
  config = dataclasses.replace(SMALL_LEAVES, small_block=64)
  leaves = tuple(jnp.asarray(np.random.default_rng(i).standard_normal(
      (4, 7 * i + 1)), jnp.float32) for i in range(1, 30))
  assert all(small(x.shape, x.dtype, config) for x in leaves)
  ref = _reference(leaves)
  np.testing.assert_allclose(gram.kernel_gram(leaves, True, config), ref,
                             rtol=2e-6, atol=2e-6 * np.abs(ref).max())


def test_probe_and_backend_variable(monkeypatch):
  gram_kernel.probe(interpret=True)
  monkeypatch.setenv(gram_kernel.ENVIRONMENT_VARIABLE, 'xla')
  assert gram_kernel.backend_from_environment() == 'xla'
  monkeypatch.setenv(gram_kernel.ENVIRONMENT_VARIABLE, 'triton')
  with pytest.raises(ValueError, match='GRAIN_OPTAX_GRAM_BACKEND'):
    gram_kernel.backend_from_environment()
  with pytest.raises(ValueError, match='GRAIN_OPTAX_GRAM_BACKEND'):
    grain_optax.gram_matrix({'b': jnp.ones((2, 3))})
  # An explicit backend is not the environment's: the variable is not read.
  k = gram.gram_of_leaves([jnp.ones((2, 3))], backend='xla')
  np.testing.assert_array_equal(k, 3 * np.ones((2, 2)))


def _pretend_one_gpu(monkeypatch):
  """The kernel's checks pass, and the branch the Gram takes is recorded."""
  monkeypatch.setattr(gram_kernel, '_one_device', lambda: True)
  monkeypatch.setattr(gram_kernel.kernel_probe, 'gpu_present', lambda: True)
  monkeypatch.setattr(gram_kernel.kernel_probe, 'passes',
                      lambda *args: True)
  taken = []

  def platform_dependent(*args, cuda, default):
    taken.append('kernel')
    return default(*args)

  monkeypatch.setattr(jax.lax, 'platform_dependent', platform_dependent)
  return taken


def test_explicit_auto_backend_ignores_the_environment(monkeypatch):
  taken = _pretend_one_gpu(monkeypatch)
  leaf = jnp.ones((4, 256, 512), jnp.bfloat16)  # supported by the kernel
  monkeypatch.setenv(gram_kernel.ENVIRONMENT_VARIABLE, 'xla')
  gram.gram_of_leaves([leaf])  # None: the environment's 'xla'
  assert not taken
  gram.gram_of_leaves([leaf], backend='auto')  # explicit: the kernel's branch
  assert taken == ['kernel']
  gram.gram_of_leaves([leaf], backend='xla')
  assert taken == ['kernel']


def test_kernel_that_fails_to_trace_falls_back_with_a_warning(monkeypatch):
  leaves = [jnp.asarray(np.random.default_rng(3).standard_normal(
      (4, 256, 512)), jnp.bfloat16)]

  def fails(*args, **kwargs):
    raise ValueError('cannot type the outputs here')

  monkeypatch.setattr(gram, 'kernel_gram', fails)
  with pytest.warns(RuntimeWarning, match=(
      "Gram matrix's Pallas GPU kernel.*ValueError: cannot type")):
    k = gram._on_gpu(*leaves)  # pylint: disable=protected-access
  np.testing.assert_array_equal(k, gram.xla_gram(*leaves))
  # A kernel that traces gives no warning.
  monkeypatch.undo()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    gram.kernel_gram(tuple(leaves), True)


@pytest.mark.skipif(jax.default_backend() != 'gpu' or jax.device_count() != 1,
                    reason='the compiled kernel needs one CUDA GPU')
def test_gram_matrix_uses_the_kernel_on_one_gpu():
  rng = np.random.default_rng(1)
  tree = {'w': jnp.asarray(rng.standard_normal((8, 768, 3072)), jnp.bfloat16),
          'e': jnp.asarray(rng.standard_normal((8, 8192, 768)), jnp.float32),
          'v': jnp.asarray(rng.standard_normal((8, 30522, 384)), jnp.bfloat16),
          'b': jnp.asarray(rng.standard_normal((8, 3072)), jnp.float32)}
  assert gram_kernel.enabled()
  hlo = jax.jit(grain_optax.gram_matrix).lower(tree).as_text()
  assert 'triton' in hlo.lower() or 'pallas' in hlo.lower()
  k = jax.jit(grain_optax.gram_matrix)(tree)
  ref = _reference(jax.tree_util.tree_leaves(tree))
  np.testing.assert_allclose(k, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
