"""Whether a Pallas GPU kernel can be used here, checked once per process.

Pallas' GPU backends change between JAX releases (the Triton one is
deprecated). Each kernel of the library comes with a probe: it builds and
runs the kernel on a problem of known answer and raises if anything is
wrong. Where the probe fails the library uses XLA instead, with a warning,
rather than failing the training step.
"""

import concurrent.futures
import functools
import warnings
from typing import Callable

import jax


@functools.lru_cache(maxsize=None)
def gpu_present() -> bool:
  """Whether JAX sees a GPU."""
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:
    return False


@functools.lru_cache(maxsize=None)
def passes(probe: Callable[[], object], kernel: str, fallback: str) -> bool:
  """Whether ``probe()`` returns without raising (run once per process).

  The probe runs in a worker thread: this is called while a step is being
  traced, and tracing contexts are per thread, so the probe runs eagerly
  there. On failure it warns, naming ``kernel`` and saying ``fallback``.
  """
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pool.submit(probe).result()
    return True
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
        f'grain_optax: {kernel} is unavailable on this JAX '
        f'({jax.__version__}): {type(e).__name__}: {e}. {fallback}',
        RuntimeWarning, stacklevel=3)
    return False
