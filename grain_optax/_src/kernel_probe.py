"""Whether a Pallas GPU kernel can be used here, checked once per process.

Pallas' GPU backends change between JAX releases (the Triton one is
deprecated). Each kernel of the library comes with a probe: it builds and
runs the kernel on a problem of known answer and raises if anything is
wrong. Where the probe fails the library uses XLA instead, with a warning,
rather than failing the training step.

Each kernel's backend is an explicit option of the library; when the option
is None, :func:`environment_backend` reads its default from an environment
variable (``GRAIN_OPTAX_EXACT_BACKEND``, ``GRAIN_OPTAX_GRAM_BACKEND``).
"""

import concurrent.futures
import functools
import os
import warnings
from typing import Callable

import jax


def environment_backend(variable: str, what: str) -> str:
  """``'auto'`` (when unset) or ``'xla'``, from the environment ``variable``.

  The documented default of a backend option left None; read when called
  (at trace time), so it is not part of ``jax.jit``'s cache key.

  Raises:
    ValueError: if the variable names neither, naming ``what`` it selects.
  """
  name = os.environ.get(variable, 'auto').strip().lower()
  if name not in ('auto', 'xla'):
    raise ValueError(
        f'grain_optax: {variable}={name!r} is not {what}; '
        "use 'auto' (the default) or 'xla'.")
  return name


def fallback_warning(kernel: str, error: Exception) -> None:
  """Warns that ``kernel`` raised ``error`` while traced, so XLA runs instead.

  Called where a kernel's trace raises (once per trace of the step).
  """
  warnings.warn(
      f'grain_optax: {kernel} could not be traced here '
      f'({type(error).__name__}: {error}); the same computation runs under '
      'XLA instead.', RuntimeWarning, stacklevel=3)


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
