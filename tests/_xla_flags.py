"""XLA flags that make the test suite compile fast on the CPU.

The suite is bound by XLA compile time on CPU (hundreds of small programs,
each with the exact solver's loops), not by run time. XLA's older CPU
emitters at LLVM -O0 compile a GRAIN + AdamW step about 4x faster (0.8 s
instead of 3.3 s of CPU time, jaxlib 0.10.2) and compute the same IEEE
operations; user code keeps XLA's defaults. The flags are probed once in a
subprocess (an XLA that does not know a flag aborts the process) and only
used where JAX runs on the CPU. GRAIN_OPTAX_TEST_FAST_COMPILE=0 runs the
suite with XLA's default flags. Workers and the tests' subprocesses inherit
the result through the environment.

Programs that do heavy arithmetic (the solver on 60 Grams of 256 groups) run
slower at -O0: tests of that kind run in a subprocess with XLA's defaults,
through ``default_flags_env``.
"""

import os
import subprocess
import sys

FAST_COMPILE_FLAGS = ('--xla_cpu_use_fusion_emitters=false',
                      '--xla_backend_optimization_level=0',
                      '--xla_llvm_disable_expensive_passes=true')
# The flags this XLA accepted (a newer jaxlib may reject some: 0.11 and later
# reject --xla_cpu_use_fusion_emitters), as the probe found them.
_CHOSEN = 'GRAIN_OPTAX_TEST_FAST_FLAGS'

_PROBE = ('import jax, jax.numpy as jnp; '
          'jax.jit(lambda x: x + 1)(jnp.zeros(2)).block_until_ready(); '
          'print(jax.default_backend())')


def _accepted(flags):
  """True if JAX runs on the CPU with ``flags`` added to XLA_FLAGS."""
  env = dict(os.environ,
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip())
  try:
    proc = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True,
                          text=True, timeout=120, env=env)
  except subprocess.TimeoutExpired:
    return False
  return proc.returncode == 0 and proc.stdout.strip().endswith('cpu')


def use_fast_compile_flags():
  if os.environ.get('GRAIN_OPTAX_TEST_FAST_COMPILE', '1') == '0':
    return
  if fast_flags_active():
    return  # Set by the pytest process that started this one.
  chosen = ' '.join(FAST_COMPILE_FLAGS)
  if not _accepted(chosen):
    # One flag unknown to this XLA aborts the process: keep those it takes.
    chosen = ' '.join(f for f in FAST_COMPILE_FLAGS if _accepted(f))
  if not chosen:
    return
  os.environ[_CHOSEN] = chosen
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                             chosen).strip()


def fast_flags_active() -> bool:
  chosen = os.environ.get(_CHOSEN)
  return bool(chosen) and chosen in os.environ.get('XLA_FLAGS', '')


def default_flags_env() -> dict:
  """This process's environment with XLA's default compile flags."""
  env = dict(os.environ)
  chosen = env.pop(_CHOSEN, '')
  if chosen:
    env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(chosen, '').strip()
  env['GRAIN_OPTAX_TEST_FAST_COMPILE'] = '0'
  return env
