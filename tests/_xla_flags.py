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

FAST_COMPILE_FLAGS = ('--xla_cpu_use_fusion_emitters=false '
                      '--xla_backend_optimization_level=0 '
                      '--xla_llvm_disable_expensive_passes=true')


def use_fast_compile_flags():
  if os.environ.get('GRAIN_OPTAX_TEST_FAST_COMPILE', '1') == '0':
    return
  if fast_flags_active():
    return  # Set by the pytest process that started this one.
  flags = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_COMPILE_FLAGS).strip()
  probe = ('import jax, jax.numpy as jnp; '
           'jax.jit(lambda x: x + 1)(jnp.zeros(2)).block_until_ready(); '
           'print(jax.default_backend())')
  try:
    proc = subprocess.run([sys.executable, '-c', probe], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, XLA_FLAGS=flags))
  except subprocess.TimeoutExpired:
    return
  if proc.returncode == 0 and proc.stdout.strip().endswith('cpu'):
    os.environ['XLA_FLAGS'] = flags


def fast_flags_active() -> bool:
  return FAST_COMPILE_FLAGS in os.environ.get('XLA_FLAGS', '')


def default_flags_env() -> dict:
  """This process's environment with XLA's default compile flags."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(FAST_COMPILE_FLAGS, '')
  env['GRAIN_OPTAX_TEST_FAST_COMPILE'] = '0'
  return env
