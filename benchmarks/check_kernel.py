"""Checks the exact solver's GPU kernel against the XLA path on this machine.

Exits non-zero if the Pallas kernel fails to compile or disagrees with the
XLA solve (weights to 1e-5 where the minimiser is unique, KKT residual
<= 1e-6). ``run_gpu.sh`` runs it first and falls back to XLA if it fails.

Usage: python benchmarks/check_kernel.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

import grain_optax
from grain_optax._src import solvers


def _solve(backend, k):
  # A fresh function, so that the backend is read at trace time.
  with solvers.exact_backend(backend):
    return jax.jit(lambda k: grain_optax.min_norm_weights(k))(k)


def main():
  rng = np.random.default_rng(0)
  worst = 0.0
  for m, p, common in ((4, 4096, 0.3), (8, 4096, 0.3), (16, 4096, 0.3),
                       (64, 8192, 0.3), (12, 5, 0.0)):
    g = rng.normal(size=(m, p)) + common * rng.normal(size=(1, p))
    k = jnp.asarray((g @ g.T).astype(np.float32))
    auto = _solve('auto', k)
    xla = _solve('xla', k)
    gap = float(jnp.max(jnp.abs(auto.weights - xla.weights)))
    if p > m:
      worst = max(worst, gap)
    print(f'm={m:3d} P={p}: kkt auto {float(auto.kkt_residual):.1e} '
          f'xla {float(xla.kkt_residual):.1e}; max |w_auto - w_xla| {gap:.1e}; '
          f'iterations {int(auto.num_iterations)}')
    if not float(auto.kkt_residual) <= 1e-6:
      sys.exit(f'kernel KKT residual too large at m={m}')
  print('platform', jax.devices()[0].platform, 'worst weight gap', worst)
  if worst > 1e-5:
    sys.exit('kernel and XLA weights disagree')


if __name__ == '__main__':
  main()
