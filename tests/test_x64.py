"""Every GRAIN path works with ``jax_enable_x64``, for float32 and float64 inputs.

x64 mode changes the default dtypes inside loops and conditionals, where the
carries and branch outputs must keep their types. It is process-wide, so the
checks run in one fresh process (this file run as a script, on this
process's platform: the GPU kernel too on a GPU machine; the sharded case on
2 CPU devices), never in the pytest worker; each test reads its check's
outcome.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grain_optax

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
DTYPES = ('float32', 'float64')

# Two groups g_1 = (1, 0), g_2 = (0, 2): the min-norm point of their hull is
# 0.8 g_1 + 0.2 g_2 = (0.8, 0.4).
GROUPS = np.array([[1.0, 0.0], [0.0, 2.0]])
WEIGHTS = np.array([0.8, 0.2])
D = np.array([0.8, 0.4])


def _dtypes(tree):
  return jax.tree_util.tree_map(lambda x: str(jnp.asarray(x).dtype), tree)


def _check_state_types_stable(init_state, new_state):
  assert (jax.tree_util.tree_structure(new_state)
          == jax.tree_util.tree_structure(init_state))
  assert _dtypes(new_state) == _dtypes(init_state), (
      _dtypes(init_state), _dtypes(new_state))


# --- The checks (run in the x64 process) ---------------------------------

def check_min_norm_weights(solver, dtype):
  g = jnp.asarray(GROUPS, dtype)
  sol = jax.jit(grain_optax.min_norm_weights, static_argnames='solver')(
      g @ g.T, solver=solver)
  np.testing.assert_allclose(np.asarray(sol.weights), WEIGHTS, atol=1e-5)
  assert float(sol.kkt_residual) <= 1e-5


def check_grain(dtype, num_groups):
  params = {'w': jnp.zeros(2, dtype)}
  tx = optax.chain(grain_optax.grain(num_groups=num_groups), optax.sgd(1.0))
  per_group = {'w': jnp.asarray(GROUPS, dtype)}
  state = tx.init(params)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(per_group, state, params)
    return (optax.apply_updates(params, updates), state), updates['w']

  # A scan: the state's types must not change from step to step.
  (params, new_state), updates = jax.lax.scan(
      step, (params, state), length=3)
  assert updates.dtype == dtype
  np.testing.assert_allclose(np.asarray(updates[-1]), -D, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(params['w']), -3 * D, rtol=1e-5)
  _check_state_types_stable(state, new_state)
  if num_groups:
    np.testing.assert_allclose(np.asarray(new_state[0].weights), WEIGHTS,
                               atol=1e-5)


def check_split_sums(dtype):
  # Per-group bias sums large enough to run in two stages (split_sums).
  x = jnp.ones((4096, 64), dtype) / 3
  loss = lambda b, x: jnp.mean(jnp.sum((x + b) ** 2, axis=1))
  grad_fn = jax.jit(grain_optax.group_value_and_grad(loss, 2,
                                                    split_sums=True))
  losses, grads = grad_fn(jnp.zeros(64, dtype), x)
  assert grads.dtype == losses.dtype == dtype
  np.testing.assert_allclose(np.asarray(grads), np.full((2, 64), 2 / 3),
                             rtol=1e-14 if dtype == 'float64' else 1e-6)


def check_inject_hyperparams(dtype):
  params = {'w': jnp.zeros(2, dtype)}
  tx = optax.chain(
      optax.inject_hyperparams(grain_optax.grain, static_args=(
          'num_groups',))(num_groups=2, regularization=1e-7),
      optax.inject_hyperparams(grain_optax.accumulate, static_args=(
          'max_every_k',))(optax.sgd(1.0), every_k=1, max_every_k=2))
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(
      {'w': jnp.asarray(GROUPS, dtype)}, state, params)
  assert updates['w'].dtype == dtype
  np.testing.assert_allclose(np.asarray(updates['w']), -D, rtol=1e-5)
  _check_state_types_stable(state, new_state)


def check_accumulate(dtype, schedule):
  params = {'w': jnp.zeros(2, dtype)}
  if schedule:
    tx = grain_optax.accumulate(optax.adam(0.1), every_k=lambda count: 2,
                                max_every_k=3)
  else:
    tx = grain_optax.accumulate(optax.adam(0.1), every_k=2)
  grads = jnp.asarray(GROUPS, dtype)
  state = tx.init(params)

  def step(carry, i):
    params, state = carry
    updates, state = tx.update({'w': grads[i % 2]}, state, params)
    return (optax.apply_updates(params, updates), state), updates['w']

  (_, new_state), updates = jax.lax.scan(step, (params, state), jnp.arange(4))
  assert updates.dtype == dtype
  np.testing.assert_array_equal(np.asarray(updates[0]), [0.0, 0.0])
  np.testing.assert_allclose(np.asarray(updates[1]), [-0.1, -0.1], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(new_state.stats.weights[:2]), WEIGHTS,
                             atol=1e-5)
  _check_state_types_stable(state, new_state)


def check_lean(dtype, non_finite):
  def loss_fn(w, batch):
    return jnp.mean((batch['x'] @ w - batch['y']) ** 2)

  batch = {'x': jnp.eye(4, dtype=dtype),
           'y': jnp.asarray([1.0, 1.0, 2.0, 2.0], dtype)}
  w = jnp.zeros(4, dtype)
  if non_finite:  # group 0 excluded; first pass one group at a time
    batch['y'] = batch['y'].at[0].set(jnp.nan)
    weights, grads = [0.0, 1.0], [0.0, 0.0, -2.0, -2.0]
  else:
    weights, grads = WEIGHTS, [-0.8, -0.8, -0.4, -0.4]
  out = jax.jit(grain_optax.grain_value_and_grad(
      loss_fn, 2, chunk_size=1 if non_finite else None))(w, batch)
  assert out.grads.dtype == dtype and out.losses.dtype == dtype
  assert int(out.num_nonfinite) == int(non_finite)
  np.testing.assert_allclose(np.asarray(out.weights), weights, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.grads), grads, rtol=1e-5)


def check_sharded(dtype):
  mesh = jax.sharding.Mesh(np.array(jax.devices('cpu')[:2]), ('data',),
                           axis_types=(jax.sharding.AxisType.Auto,))
  tx = grain_optax.grain(num_groups=4, axis_name='data', mesh=mesh)
  spec = jax.sharding.PartitionSpec
  per_group = jax.device_put(
      {'w': jnp.asarray(np.concatenate([GROUPS, GROUPS]), dtype)},
      jax.sharding.NamedSharding(mesh, spec('data')))
  params = jax.device_put({'w': jnp.zeros(2, dtype)},
                          jax.sharding.NamedSharding(mesh, spec()))
  updates, state = jax.jit(tx.update)(per_group, tx.init(params), params)
  assert updates['w'].dtype == dtype
  np.testing.assert_allclose(np.asarray(updates['w']), D, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.weights), np.tile(WEIGHTS, 2) / 2,
                             atol=1e-5)


def check_readme_quick_start():
  block = re.search(r'## Quick start\n.*?```python\n(.*?)```',
                    README.read_text(), re.S).group(1)
  exec(compile(block, 'README.md[quick start]', 'exec'), {})  # pylint: disable=exec-used


# Each check compiles a GRAIN solver (seconds on 2 cores): both dtypes for
# every path, not every combination of the other options.
CHECKS = {
    **{f'min_norm_weights[{s}-{d}]': (check_min_norm_weights, (s, d))
       for s in ('exact', 'projected_gradient') for d in DTYPES},
    'grain[float32]': (check_grain, ('float32', None)),
    'grain[float64-num_groups=2]': (check_grain, ('float64', 2)),
    'accumulate[float32-int]': (check_accumulate, ('float32', False)),
    'accumulate[float64-schedule]': (check_accumulate, ('float64', True)),
    'inject_hyperparams[float32]': (check_inject_hyperparams, ('float32',)),
    'lean[float32]': (check_lean, ('float32', False)),
    'lean[float64-non_finite-chunked]': (check_lean, ('float64', True)),
    'split_sums[float32]': (check_split_sums, ('float32',)),
    'split_sums[float64]': (check_split_sums, ('float64',)),
    'sharded[float32]': (check_sharded, ('float32',)),
    'sharded[float64]': (check_sharded, ('float64',)),
    'readme_quick_start': (check_readme_quick_start, ()),
}


def run_checks(out):
  """Runs every check in this (x64) process; writes name -> error or ''."""
  assert jax.config.jax_enable_x64
  results = {}
  for name, (fn, args) in CHECKS.items():
    start = time.perf_counter()
    try:
      # The checks compare numbers: float32 matmuls, not a GPU's TF32.
      with jax.default_matmul_precision('highest'):
        fn(*args)
      results[name] = ''
    except Exception:  # pylint: disable=broad-except
      results[name] = traceback.format_exc()[-4000:]
    print(f'{name}: {time.perf_counter() - start:.1f} s', flush=True)
  pathlib.Path(out).write_text(json.dumps(results))


# --- The tests (in the pytest worker, x64 off) -----------------------------

@pytest.fixture(scope='module')
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp('x64') / 'results.json'
  env = dict(os.environ, JAX_ENABLE_X64='1')
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # GPU shared
  if env.get('JAX_PLATFORMS') and 'cpu' not in env['JAX_PLATFORMS']:
    env['JAX_PLATFORMS'] += ',cpu'  # the sharded check's devices
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=2')
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


def test_x64_does_not_leak_into_this_process():
  assert not jax.config.jax_enable_x64
  assert jnp.zeros(1).dtype == jnp.float32


def test_works_in_x64_mode(results):
  # One test for every check, so that pytest-xdist runs the (slow) x64
  # process once, not once per worker.
  assert set(results) == set(CHECKS)
  failed = {name: error for name, error in results.items() if error}
  assert not failed, '\n\n'.join(f'{n}:\n{e}' for n, e in failed.items())


if __name__ == '__main__':
  jax.config.update('jax_enable_x64', True)
  run_checks(sys.argv[1])
