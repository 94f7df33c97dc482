"""GRAIN over many devices: shard_map, jit + sharding, FSDP and multi-host.

The 8-device and 2-process checks run in subprocesses (XLA_FLAGS must be set
before jax is imported): tests/_sharding_devices.py and
tests/_sharding_multihost.py. The tests here also run the collective path on
one device with ``jax.vmap(..., axis_name=...)`` standing in for devices.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import grain_optax
from grain_optax.testing import collective_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BYTES_TOLERANCE = 1.01


def _env():
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  # Keep the suite's compile flags (conftest.py), drop any device count.
  env['XLA_FLAGS'] = ' '.join(
      f for f in env.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count'))
  return env


def _run_case(case, timeout=240):
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, '_sharding_devices.py'), case],
      env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert lines, proc.stdout[-3000:]
  return json.loads(lines[-1][len('RESULT '):])


# ---------------------------------------------------------------------------
# 8 CPU devices (subprocesses).


def test_apply_variants_in_both_data_parallel_forms_on_8_devices():
  # apply='mean' and 'mean_at_grain_length', with 1 and 2 groups per device, under jit + sharding and inside
  # shard_map, equals the one-device update (checked to 1e-5 inside); the
  # monitor mode equals jax.grad of the whole batch.
  r = _run_case('apply')
  assert len([key for key in r if key.endswith('_err')]) == 8, r
  assert max(r.values()) < 1e-5, r


def test_jit_data_parallel_on_8_devices():
  r = _run_case('jit')
  # Update and weights equal a single-device run (checked to 1e-5 inside;
  # weights also bitwise equal on all devices), in Auto and Explicit mode.
  for key in ('auto_k1_err', 'auto_k2_err', 'explicit_k1_err', 'train_err'):
    assert r[key] < 1e-5, (key, r)
  # One group per device: the bytes of the mean's all-reduce.
  assert r['auto_k1'] <= BYTES_TOLERANCE, r
  assert r['explicit_k1'] <= BYTES_TOLERANCE, r
  # k groups per device: (k + 1) / 2 times the all-reduce.
  assert r['auto_k2'] <= 1.5 * BYTES_TOLERANCE, r
  # bfloat16 matmuls: groups and update move in bfloat16, as the mean's
  # all-reduce does; the update is the single-device one rounded once.
  assert r['bf16_k1'] <= BYTES_TOLERANCE, r
  assert r['bf16_k1_weights_err'] < 1e-5, r
  assert r['bf16_k1_rel_err'] < 2 ** -7, r
  # Two-stage per-group sums (split_sums) with the group axis sharded.
  assert r['auto_split_sums_err'] < 1e-5, r
  assert r['explicit_split_sums_err'] < 1e-5, r


def test_shard_map_data_parallel_on_8_devices():
  r = _run_case('shard_map')
  assert r['k1_err'] < 1e-5 and r['k2_err'] < 1e-5, r
  assert r['k1'] <= BYTES_TOLERANCE, r
  assert r['k2'] <= 1.5 * BYTES_TOLERANCE, r
  assert r['pitfall_error'], r
  # A tuple of mesh axes (e.g. slices x chips), in shard_map and under jit.
  assert r['tuple_shard_map_err'] < 1e-5 and r['tuple_jit_err'] < 1e-5, r
  assert r['tuple_jit'] <= BYTES_TOLERANCE, r


def test_sharded_parameters_on_8_devices():
  r = _run_case('fsdp')
  # Parameter-sharded gradients: only one or a few [m, m] all-reduces.
  for key in ('model_sharded_AxisType.Auto_bytes',
              'model_sharded_AxisType.Explicit_bytes'):
    assert r[key] <= 3 * 2 * 8 * 8 * 4, r
  # FSDP over the batch axis: the bytes of the mean's reduce-scatter.
  assert r['fsdp_AxisType.Auto_ratio'] <= BYTES_TOLERANCE, r
  assert r['fsdp_AxisType.Explicit_ratio'] <= BYTES_TOLERANCE, r
  assert r['shard_map_fsdp_ratio'] <= BYTES_TOLERANCE, r
  assert r['explicit_dp_tp_ratio'] <= BYTES_TOLERANCE, r
  assert r['gram_rel_err'] < 1e-5, r
  # Parameter blocks in shard_map: one [m, m] all-reduce, nothing gathered.
  assert r['param_axis_bytes'] <= 2 * 8 * 8 * 4, r


def test_data_parallel_example_runs():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'examples', 'data_parallel.py'),
       '--form', 'shard_map', '--groups-per-device', '2', '--steps', '20'],
      env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-6000:]
  out = proc.stdout
  assert '8 devices' in out and 'grain' in out, out
  ratio = float(out.split('GRAIN / mean collective bytes: ')[1].split()[0])
  assert 1.5 / BYTES_TOLERANCE <= ratio <= 1.5 * BYTES_TOLERANCE, out


# ---------------------------------------------------------------------------
# Two processes on 127.0.0.1.


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_single_device_reference():
  num_processes = 2
  with tempfile.TemporaryDirectory() as tmp:
    port = _free_port()
    outs = [os.path.join(tmp, f'out{i}.json') for i in range(num_processes)]
    logs = [open(os.path.join(tmp, f'log{i}.txt'), 'w+')
            for i in range(num_processes)]
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, '_sharding_multihost.py'),
         str(i), str(num_processes), str(port), outs[i]],
        env=_env(), cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(num_processes)]
    try:
      codes = [p.wait(timeout=180) for p in procs]
    finally:
      for p in procs:  # Only on failure or timeout: kill what is left.
        if p.poll() is None:
          p.kill()
          p.wait()
    output = []
    for log in logs:
      log.seek(0)
      output.append(log.read()[-4000:])
      log.close()
    assert codes == [0] * num_processes, output
    reports = []
    for path in outs:
      with open(path) as f:
        reports.append(json.load(f))
  for r in reports:
    assert r['devices'] == 8
    assert r['jit_err'] < 1e-5, r
    assert r['shard_map_err'] < 1e-5, r
    assert r['bytes_ratio'] <= BYTES_TOLERANCE, r
  # The weights are bitwise the same on all 8 devices of both processes.
  shards = [s for r in reports for s in r['weight_shards']]
  rows = [s for r in reports for s in r['shard_map_weight_rows']]
  assert len(shards) == 8 and len(set(shards)) == 1
  assert len(rows) == 8 and len(set(rows)) == 1


# ---------------------------------------------------------------------------
# One device: the collective path with vmap standing in for devices.


def _groups(seed, devices, k, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {
      'w': rng.normal(size=(devices, k, 3, 5)).astype(dtype),   # 15: padded
      'b': rng.normal(size=(devices, k, 7)).astype(jnp.bfloat16),
      's': rng.normal(size=(devices, k)).astype(dtype),          # scalar param
  }


def _merge(tree):
  return jax.tree_util.tree_map(
      lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


@pytest.mark.parametrize('devices,k', [(4, 1), (4, 3), (3, 2)])
def test_collective_path_equals_single_device(devices, k):
  g = _groups(devices * 10 + k, devices, k)

  def local(g):
    r = grain_optax.min_norm_point(g, axis_name='data')
    return r.update, r.solution.weights, r.gram

  d, w, gram = jax.jit(jax.vmap(local, axis_name='data'))(g)
  ref = grain_optax.min_norm_point(_merge(g))
  for i in range(devices):  # The same on every "device".
    np.testing.assert_array_equal(w[i], w[0])
    np.testing.assert_array_equal(gram[i], gram[0])
  np.testing.assert_allclose(w[0], ref.solution.weights, atol=1e-6)
  np.testing.assert_allclose(gram[0], ref.gram, rtol=1e-5, atol=1e-5)
  for name in g:
    assert d[name].dtype == g[name].dtype
    assert d[name].shape == (devices,) + g[name].shape[2:]
    np.testing.assert_allclose(np.asarray(d[name][0], np.float32),
                               np.asarray(ref.update[name], np.float32),
                               rtol=1e-2 if name == 'b' else 1e-5, atol=1e-6)


def test_grain_with_axis_name_counts_all_groups_and_is_chainable():
  devices, k = 4, 2
  g = _groups(0, devices, k)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[2:], x.dtype), g)
  tx = optax.chain(
      grain_optax.grain(num_groups=devices * k, axis_name='data'),
      optax.sgd(1.0))
  ref_tx = optax.chain(grain_optax.grain(num_groups=devices * k),
                       optax.sgd(1.0))

  def local(g):
    return tx.update(g, tx.init(params), params, extra='ignored')

  updates, state = jax.vmap(local, axis_name='data')(g)
  ref_updates, ref_state = ref_tx.update(_merge(g), ref_tx.init(params), params)
  assert state[0].weights.shape == (devices, devices * k)
  np.testing.assert_allclose(state[0].weights[2], ref_state[0].weights,
                             atol=1e-6)
  np.testing.assert_allclose(state[0].min_cosine[1], ref_state[0].min_cosine,
                             atol=1e-5)
  np.testing.assert_allclose(updates['w'][3], ref_updates['w'], atol=1e-5)


def test_nonfinite_group_on_one_device_is_excluded():
  devices, k = 4, 1
  g = _groups(3, devices, k)
  g['w'][2, 0, 1, 1] = np.nan

  def local(g):
    tx = grain_optax.grain(num_groups=devices, axis_name='data')
    return tx.update(g, tx.init(None))

  d, state = jax.vmap(local, axis_name='data')(g)
  assert int(state.num_nonfinite[0]) == 1
  assert float(state.weights[0, 2]) == 0.0
  for leaf in jax.tree_util.tree_leaves(d):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_shard_map_on_one_device_and_wrong_group_count():
  mesh = jax.make_mesh((1,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  g = {'w': jnp.array([[1., 0.], [0., 2.]])}

  def local(g, num_groups):
    tx = grain_optax.grain(num_groups=num_groups, axis_name='data')
    return tx.update(g, tx.init(None))[0]

  run = lambda n: jax.jit(jax.shard_map(
      lambda g: local(g, n), mesh=mesh, in_specs=P('data'),
      out_specs=P()))(g)
  np.testing.assert_allclose(run(2)['w'], [0.8, 0.4], atol=1e-6)
  with pytest.raises(ValueError, match='2 groups in all'):
    run(3)


# ---------------------------------------------------------------------------
# Trace-time errors.


def test_axis_name_under_jit_without_mesh_is_a_clear_error():
  tx = grain_optax.grain(axis_name='data')
  g = {'w': jnp.ones((4, 3))}
  with pytest.raises(ValueError, match='set_mesh'):
    jax.jit(tx.update)(g, tx.init(None))


def test_param_axis_name_outside_shard_map_is_an_error():
  tx = grain_optax.grain(param_axis_name='model')
  with pytest.raises(ValueError, match='shard_map'):
    jax.jit(tx.update)({'w': jnp.ones((4, 3))}, tx.init(None))
  with pytest.raises(ValueError, match='shard_map'):
    grain_optax.gram_matrix({'w': jnp.ones((4, 3))}, param_axis_name='model')


def test_bad_axis_arguments():
  with pytest.raises(ValueError, match='empty'):
    grain_optax.grain(axis_name=())
  with pytest.raises(ValueError, match='repeats'):
    grain_optax.grain(axis_name=('data', 'data'))
  with pytest.raises(ValueError, match='share an axis'):
    grain_optax.min_norm_point({'w': jnp.ones((2, 3))}, axis_name='x',
                               param_axis_name=('x',))
  with pytest.raises(ValueError, match='unknown solver'):
    grain_optax.min_norm_point({'w': jnp.ones((2, 3))}, solver='nope')


def test_min_norm_point_without_axes_is_the_single_device_path():
  g = {'w': jnp.array([[1., 0.], [0., 3.]])}
  r = grain_optax.min_norm_point(g)
  np.testing.assert_allclose(r.solution.weights, [0.9, 0.1], atol=1e-6)
  np.testing.assert_allclose(r.update['w'], [0.9, 0.3], atol=1e-6)
  np.testing.assert_allclose(r.gram, [[1., 0.], [0., 9.]])


# ---------------------------------------------------------------------------
# collective_bytes on HLO text.

_HLO = """HloModule jit_step, num_partitions=8

ENTRY %main {
  %p0 = f32[1000]{0} parameter(0)
  %p1 = bf16[8,500]{1,0} parameter(1)
  %p2 = f32[125]{0} parameter(2)
  %ar = f32[1000]{0} all-reduce(%p0), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ag-start = (f32[125]{0}, f32[1000]{0}) all-gather-start(%p2), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %ag-done = f32[1000]{0} all-gather-done(%ag-start)
  %a2a = (bf16[1,500]{1,0}, bf16[1,500]{1,0}) all-to-all(%s0, %s1), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
  %s0 = bf16[1,500]{1,0} slice(%p1), slice={[0:1], [0:500]}
  %s1 = bf16[1,500]{1,0} slice(%p1), slice={[1:2], [0:500]}
  %rs = f32[125]{0} reduce-scatter(%p0), channel_id=4, replica_groups={}, dimensions={0}, to_apply=%add
  %cp = f32[125]{0} collective-permute(%p2), channel_id=5, source_target_pairs={{0,1},{1,2}}
  %ar2 = f32[4,4]{0,1} all-reduce(%g), channel_id=6, replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_2'}, to_apply=%add
  %g = f32[4,4]{1,0} parameter(3)
  ROOT %t = (f32[1000]{0}) tuple(%ar)
}
"""


def test_collective_bytes_parses_group_formats_and_async_pairs():
  c = collective_bytes(_HLO)
  # Groups of 4; and 'axis_2'=4 with device_ids between mesh and axes.
  assert c['all-reduce'] == (2, 4064, 2 * 3 / 4 * 4064)
  assert c['all-gather'] == (1, 500, 7 * 500)                # groups of 8
  assert c['all-to-all'] == (1, 2000, 3 / 4 * 2000)           # 'axis_1'=4
  assert c['reduce-scatter'] == (1, 4000, 7 / 8 * 4000)       # {} = all 8
  assert c['collective-permute'] == (1, 500, 500)
  assert c['total'].count == 6
  assert c['total'].sent_bytes == pytest.approx(
      6096 + 3500 + 1500 + 3500 + 500)


def test_collective_bytes_lives_in_grain_optax_testing_only():
  import grain_optax.testing  # pylint: disable=g-import-not-at-top
  assert grain_optax.testing.collective_bytes is collective_bytes
  assert set(grain_optax.testing.__all__) == {
      'collective_bytes', 'COLLECTIVE_KINDS', 'CollectiveCost'}
  assert not set(grain_optax.testing.__all__) & set(grain_optax.__all__)


def test_collective_bytes_of_a_real_program_without_collectives():
  compiled = jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((4, 4))).compile()
  assert collective_bytes(compiled)['total'].count == 0


def test_communication_dtype_rounds_what_moves():
  devices, k = 4, 2
  g = {'w': np.random.default_rng(5).normal(size=(devices, k, 6, 5)).astype(
      np.float32)}

  def local(g, dtype):
    r = grain_optax.min_norm_point(g, axis_name='data',
                                   communication_dtype=dtype)
    return r.update, r.solution.weights

  d16, w16 = jax.vmap(lambda g: local(g, jnp.bfloat16), axis_name='data')(g)
  d32, w32 = jax.vmap(lambda g: local(g, None), axis_name='data')(g)
  merged = _merge(g)
  rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), merged)
  ref16 = grain_optax.min_norm_point(rounded)
  ref32 = grain_optax.min_norm_point(merged)
  # Moved in bfloat16: optimal for the rounded groups, d rounded once.
  assert d16['w'].dtype == jnp.float32
  np.testing.assert_allclose(w16[0], ref16.solution.weights, atol=1e-6)
  np.testing.assert_array_equal(
      d16['w'][0], np.asarray(ref16.update['w'].astype(jnp.float32)))
  np.testing.assert_allclose(w32[0], ref32.solution.weights, atol=1e-6)
  np.testing.assert_allclose(d32['w'][0], ref32.update['w'], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match='communication_dtype'):
    grain_optax.grain(communication_dtype=jnp.int32)
