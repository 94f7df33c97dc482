"""Checks of GRAIN on 8 CPU devices, run by tests/test_min_norm_point.py.

Usage: python tests/_sharding_devices.py CASE   (CASE: jit, shard_map, fsdp,
apply)

Sets XLA_FLAGS for 8 host devices before importing jax, runs the case's
checks (assertions) and prints one JSON line of measured numbers for the test
to check as well.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import grain_optax
from grain_optax.testing import collective_bytes

D = 8
SIZES = (128, 512, 256, 10)  # 200,970 parameters
BATCH = 64


def init_params(seed):
  # NumPy, not jax.random: every eager jax op compiles for 8 devices.
  rng = np.random.default_rng(seed)
  return {f'layer{i}': {'w': (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
                        'b': np.zeros(b, np.float32)}
          for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))}


def loss_fn(params, batch):
  h = batch['x']
  for i in range(len(params)):
    h = h @ params[f'layer{i}']['w'] + params[f'layer{i}']['b']
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, batch['y']).mean()


def make_batch(seed):
  # Labels depend on the inputs and on the example's position, so that the
  # groups (contiguous slices of the batch) disagree.
  x = np.random.default_rng(seed).normal(size=(BATCH, SIZES[0]))
  y = (np.argmax(x[:, :10], axis=1) + np.arange(BATCH) // 16) % 10
  return {'x': x.astype(np.float32), 'y': y.astype(np.int32)}


def max_err(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float32) -
                                 np.asarray(y, np.float32))))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def reference_update(params, batch, m):
  tx = grain_optax.grain(num_groups=m)

  @jax.jit
  def f(params, batch):
    _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
    return tx.update(grads, tx.init(params), params)
  return f(params, batch)


def shards_identical(arr):
  """True if every device's copy of a replicated array is bitwise equal."""
  shards = [np.asarray(s.data) for s in arr.addressable_shards]
  assert len(shards) == D, len(shards)
  return all(s.tobytes() == shards[0].tobytes() for s in shards)


def sent(compiled):
  return collective_bytes(compiled)['total'].sent_bytes


def case_jit():
  params = init_params(0)
  batch = make_batch(1)
  out = {}
  for axis_type in ('auto', 'explicit'):
    mesh = jax.make_mesh(
        (D,), ('data',),
        axis_types=(AxisType.Auto if axis_type == 'auto' else
                    AxisType.Explicit,))
    for k in ((1, 2) if axis_type == 'auto' else (1,)):
      m = D * k
      d_ref, s_ref = reference_update(params, batch, m)
      # Auto axes: the axis is named; Explicit: read from the arrays' types.
      tx = grain_optax.grain(
          num_groups=m, axis_name='data' if axis_type == 'auto' else None)

      def step(params, batch, tx=tx, m=m):
        _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
        return tx.update(grads, tx.init(params), params)

      def mean_step(params, batch):
        return jax.grad(loss_fn)(params, batch)

      with jax.set_mesh(mesh):
        p = jax.device_put(params, NamedSharding(mesh, P()))
        b = jax.device_put(batch, NamedSharding(mesh, P('data')))
        compiled = jax.jit(step).lower(p, b).compile()
        d, state = compiled(p, b)
        counts = collective_bytes(compiled)
        grain_bytes = counts['total'].sent_bytes
        mean_bytes = sent(jax.jit(mean_step).lower(p, b).compile())
      assert max_err(d, d_ref) < 1e-5, max_err(d, d_ref)
      assert max_err(state.weights, s_ref.weights) < 1e-5
      assert shards_identical(state.weights)
      assert all(shards_identical(x) for x in jax.tree_util.tree_leaves(d))
      assert counts['all-to-all'].count >= 1, counts
      out[f'{axis_type}_k{k}'] = grain_bytes / mean_bytes
      out[f'{axis_type}_k{k}_err'] = max_err(d, d_ref)

  # bfloat16 matmuls on float32 params: the per-group gradients of the
  # weights come in bfloat16 (grad_dtype='backward'), and the groups move in
  # the dtype the mean's all-reduce uses.
  def loss16(params, batch):
    h = batch['x'].astype(jnp.bfloat16)
    for i in range(len(params)):
      h = (h @ params[f'layer{i}']['w'].astype(jnp.bfloat16)
           + params[f'layer{i}']['b'].astype(jnp.bfloat16))
      if i < len(params) - 1:
        h = jnp.tanh(h)
    return optax.softmax_cross_entropy_with_integer_labels(
        h.astype(jnp.float32), batch['y']).mean()

  tx = grain_optax.grain(num_groups=D, axis_name='data')

  def step16(params, batch):
    _, grads = grain_optax.group_value_and_grad(loss16, D)(params, batch)
    return tx.update(grads, tx.init(params), params)

  mesh = jax.make_mesh((D,), ('data',), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    p = jax.device_put(params, NamedSharding(mesh, P()))
    b = jax.device_put(batch, NamedSharding(mesh, P('data')))
    compiled = jax.jit(step16).lower(p, b).compile()
    d, state = compiled(p, b)
    grain_bytes = sent(compiled)
    mean_bytes = sent(jax.jit(jax.grad(loss16)).lower(p, b).compile())
  ref_tx = grain_optax.grain(num_groups=D)
  _, ref_grads = jax.jit(grain_optax.group_value_and_grad(loss16, D))(
      params, batch)
  d_ref, s_ref = ref_tx.update(ref_grads, ref_tx.init(params), params)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(d))
  out['bf16_k1'] = grain_bytes / mean_bytes
  out['bf16_k1_weights_err'] = max_err(state.weights, s_ref.weights)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(d_ref))
  out['bf16_k1_rel_err'] = max_err(d, d_ref) / scale

  # Several training steps against a single-device run of the same chain.
  m = 2 * D
  tx = optax.chain(grain_optax.grain(num_groups=m, axis_name='data'),
                   optax.sgd(0.1, momentum=0.9))

  def train_step(params, opt_state, batch):
    _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  ref_tx = optax.chain(grain_optax.grain(num_groups=m),
                       optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def ref_step(params, opt_state, batch):
    _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
    updates, opt_state = ref_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  mesh = jax.make_mesh((D,), ('data',), axis_types=(AxisType.Auto,))
  ref_params, ref_state = params, ref_tx.init(params)
  with jax.set_mesh(mesh):
    p = jax.device_put(params, NamedSharding(mesh, P()))
    s = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    jitted = jax.jit(train_step)
    for i in range(4):
      b = jax.device_put(make_batch(10 + i), NamedSharding(mesh, P('data')))
      p, s = jitted(p, s, b)
      # One step in flight: 8 simulated devices on 2 cores can starve a
      # device thread at a collective when steps queue up.
      jax.block_until_ready(p)
      ref_params, ref_state = ref_step(ref_params, ref_state, make_batch(10 + i))
  out['train_err'] = max_err(p, ref_params)
  assert out['train_err'] < 1e-5, out['train_err']
  assert max_err(s[0].weights, ref_state[0].weights) < 1e-5

  # Groups of 1024 rows: their bias sums run in two stages (split_sums), on
  # the group axis sharded over Auto and Explicit mesh axes alike.
  def dense_loss(params, batch):
    return jnp.mean(jnp.square(batch['x'] @ params['w'] + params['b']
                               - batch['y']))

  rng = np.random.default_rng(5)
  big = {'x': rng.normal(size=(D * 1024, 32)).astype(np.float32),
         'y': rng.normal(size=(D * 1024, 96)).astype(np.float32)}
  dense = {'w': 0.1 * np.ones((32, 96), np.float32),
           'b': np.zeros(96, np.float32)}
  _, ref = jax.jit(grain_optax.group_value_and_grad(
      dense_loss, D, split_sums=False))(dense, big)
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((D,), ('data',), axis_types=(axis_type,))
    grad_fn = grain_optax.group_value_and_grad(dense_loss, D,
                                               split_sums=True)
    with jax.set_mesh(mesh):
      p = jax.device_put(dense, NamedSharding(mesh, P()))
      b = jax.device_put(big, NamedSharding(mesh, P('data')))
      assert 'optimization_barrier' in str(jax.make_jaxpr(grad_fn)(p, b))
      _, grads = jax.jit(grad_fn)(p, b)
    name = 'explicit' if axis_type == AxisType.Explicit else 'auto'
    out[f'{name}_split_sums_err'] = max_err(grads, ref)
  return out


def case_shard_map():
  params = init_params(0)
  batch = make_batch(2)
  mesh = jax.make_mesh((D,), ('data',), axis_types=(AxisType.Auto,))
  out = {}
  for k in (1, 2):
    m = D * k
    d_ref, s_ref = reference_update(params, batch, m)
    tx = grain_optax.grain(num_groups=m, axis_name='data')

    def local(params, batch, tx=tx, k=k):
      # Without the pcast, jax.grad would sum the gradients over 'data'.
      varying = jax.lax.pcast(params, 'data', to='varying')
      _, grads = grain_optax.group_value_and_grad(loss_fn, k)(varying, batch)
      d, state = tx.update(grads, tx.init(params), params)
      return d, state, state.weights[None]

    step = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P('data')),
        out_specs=(P(), P(), P('data'))))
    d, state, per_device = step(params, batch)
    per_device = np.asarray(per_device)
    assert all(row.tobytes() == per_device[0].tobytes() for row in per_device)
    assert max_err(d, d_ref) < 1e-5, max_err(d, d_ref)
    assert max_err(state.weights, s_ref.weights) < 1e-5

    def mean_local(params, batch):
      varying = jax.lax.pcast(params, 'data', to='varying')
      return jax.lax.pmean(jax.grad(loss_fn)(varying, batch), 'data')

    mean = jax.jit(jax.shard_map(mean_local, mesh=mesh,
                                 in_specs=(P(), P('data')), out_specs=P()))
    out[f'k{k}'] = sent(step.lower(params, batch).compile()) / sent(
        mean.lower(params, batch).compile())
    out[f'k{k}_err'] = max_err(d, d_ref)

  # A batch sharded over two mesh axes (e.g. slices x chips on a pod): a
  # tuple axis_name, in shard_map and under jit.
  mesh2 = jax.make_mesh((2, 4), ('replica', 'data'),
                        axis_types=(AxisType.Auto,) * 2)
  axes = ('replica', 'data')
  d_ref, s_ref = reference_update(params, batch, D)
  tx = grain_optax.grain(num_groups=D, axis_name=axes)

  def local2(params, batch):
    varying = jax.lax.pcast(params, axes, to='varying')
    _, grads = grain_optax.group_value_and_grad(loss_fn, 1)(varying, batch)
    return tx.update(grads, tx.init(params), params)[0]

  d = jax.jit(jax.shard_map(local2, mesh=mesh2, in_specs=(P(), P(axes)),
                            out_specs=P()))(params, batch)
  out['tuple_shard_map_err'] = max_err(d, d_ref)

  def step2(params, batch):
    _, grads = grain_optax.group_value_and_grad(loss_fn, D)(params, batch)
    return tx.update(grads, tx.init(params), params)

  with jax.set_mesh(mesh2):
    p = jax.device_put(params, NamedSharding(mesh2, P()))
    b = jax.device_put(batch, NamedSharding(mesh2, P(axes)))
    compiled = jax.jit(step2).lower(p, b).compile()
    d, state = compiled(p, b)
    mean_bytes = sent(jax.jit(jax.grad(loss_fn)).lower(p, b).compile())
  assert shards_identical(state.weights)
  out['tuple_jit_err'] = max_err(d, d_ref)
  out['tuple_jit'] = sent(compiled) / mean_bytes
  assert max(out['tuple_jit_err'], out['tuple_shard_map_err']) < 1e-5, out

  # The pitfall: gradients of replicated params are summed over the axis.
  tx = grain_optax.grain(axis_name='data')

  def summed(params, batch):
    _, grads = grain_optax.group_value_and_grad(loss_fn, 1)(params, batch)
    return tx.update(grads, tx.init(params), params)[0]

  try:
    jax.jit(jax.shard_map(summed, mesh=mesh, in_specs=(P(), P('data')),
                          out_specs=P()))(params, batch)
  except ValueError as e:
    assert 'pcast' in str(e), e
    out['pitfall_error'] = True
  else:
    raise AssertionError('replicated gradients were not rejected')
  return out


def case_fsdp():
  out = {}
  rng = np.random.default_rng(0)
  m = D
  g = {'w': rng.normal(size=(m, 256, 512)).astype(np.float32),
       'b': rng.normal(size=(m, 512)).astype(np.float32),
       'c': rng.normal(size=(m, 10)).astype(np.float32)}
  params = jax.tree_util.tree_map(
      lambda x: np.zeros(x.shape[1:], np.float32), g)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  tx = grain_optax.grain(num_groups=m)
  d_ref, s_ref = jax.jit(tx.update)(g, tx.init(params), params)
  gram_bytes = m * m * 4

  # 1. jit, gradients sharded along parameter dimensions, groups not spread:
  #    plain grain(); only the [m, m] partial Grams are all-reduced.
  spec = {'w': P(None, 'model'), 'b': P('model'), 'c': P()}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((D,), ('model',), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
      gs = jax.device_put(
          g, {n: NamedSharding(mesh, P(None, *s)) for n, s in spec.items()})
      ps = jax.device_put(params,
                          {n: NamedSharding(mesh, s) for n, s in spec.items()})
      f = jax.jit(tx.update)
      d, state = f(gs, tx.init(ps), ps)
      cost = collective_bytes(f.lower(gs, tx.init(ps), ps).compile())
    assert max_err(d, d_ref) < 1e-5
    assert shards_identical(state.weights)
    assert d['w'].sharding.spec == P(None, 'model'), d['w'].sharding
    # Nothing but Gram-sized all-reduces (a few leaves' worth at most).
    assert cost['total'].count == cost['all-reduce'].count, cost
    assert cost['total'].operand_bytes <= 3 * gram_bytes, cost
    out[f'model_sharded_{axis_type}_bytes'] = cost['total'].sent_bytes

  # 1b. jit, Explicit (data, model) mesh: groups over 'data', parameters
  #     over 'model' (data + tensor parallelism); automatic.
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(AxisType.Explicit,) * 2)
  m4 = 4
  g4 = jax.tree_util.tree_map(lambda x: x[:m4], g)
  tx4 = grain_optax.grain(num_groups=m4)
  d4_ref, s4_ref = jax.jit(tx4.update)(g4, tx4.init(params), params)
  with jax.set_mesh(mesh):
    gs = jax.device_put(
        g4, {n: NamedSharding(mesh, P('data', *s)) for n, s in spec.items()})
    ps = jax.device_put(params,
                        {n: NamedSharding(mesh, s) for n, s in spec.items()})
    compiled = jax.jit(tx4.update).lower(gs, tx4.init(ps), ps).compile()
    d, state = compiled(gs, tx4.init(ps), ps)
  assert max_err(d, d4_ref) < 1e-5, max_err(d, d4_ref)
  assert max_err(state.weights, s4_ref.weights) < 1e-5
  assert d['w'].sharding.spec == P(None, 'model'), d['w'].sharding
  # The mean would all-reduce each device's half of the params over 'data'.
  allreduce_blocks = 2 * (3 / 4) * 4 * (n_params / 2)
  out['explicit_dp_tp_ratio'] = sent(compiled) / allreduce_blocks

  # 2. jit FSDP over the batch axis: params sharded over 'data' too. The
  #    group gradients go by all-to-all straight to the parameter layout; the
  #    baseline is the reduce-scatter of the mean gradient.
  spec = {'w': P(None, 'data'), 'b': P('data'), 'c': P()}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((D,), ('data',), axis_types=(axis_type,))
    if axis_type == AxisType.Auto:
      txf = grain_optax.grain(num_groups=m, axis_name='data',
                              param_sharding=spec)
    else:  # Explicit axes: everything is read from the arrays' types.
      txf = grain_optax.grain(num_groups=m)
    with jax.set_mesh(mesh):
      gs = jax.device_put(g, NamedSharding(mesh, P('data')))
      ps = jax.device_put(params,
                          {n: NamedSharding(mesh, s) for n, s in spec.items()})
      f = jax.jit(txf.update)
      d, state = f(gs, txf.init(ps), ps)
      cost = collective_bytes(f.lower(gs, txf.init(ps), ps).compile())
    assert max_err(d, d_ref) < 1e-5
    assert shards_identical(state.weights)
    assert d['w'].sharding.spec == P(None, 'data'), d['w'].sharding
    # The mean's reduce-scatter sends 4 P (D-1)/D bytes per device.
    reduce_scatter = 4 * n_params * (D - 1) / D
    out[f'fsdp_{axis_type}_ratio'] = cost['total'].sent_bytes / reduce_scatter

  # 3. shard_map over ('data', 'model'): one group per device of 'data',
  #    parameter blocks over 'model' (the bias 'c' replicated).
  m4 = 4
  g4 = jax.tree_util.tree_map(lambda x: x[:m4], g)
  tx4 = grain_optax.grain(num_groups=m4)
  d4_ref, s4_ref = jax.jit(tx4.update)(g4, tx4.init(params), params)
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(AxisType.Auto,) * 2)
  txs = grain_optax.grain(num_groups=m4, axis_name='data',
                          param_axis_name='model')
  in_spec = {'w': P('data', None, 'model'), 'b': P('data', 'model'),
             'c': P('data')}
  d_spec = {'w': P(None, 'model'), 'b': P('model'), 'c': P()}

  def local(g):
    d, state = txs.update(g, txs.init(None))
    return d, state.weights[None, None]

  sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(in_spec,),
                             out_specs=(d_spec, P('data', 'model'))))
  compiled = sm.lower(g4).compile()
  d, per_device = compiled(g4)
  per_device = np.asarray(per_device).reshape(-1, m4)
  assert all(r.tobytes() == per_device[0].tobytes() for r in per_device)
  assert max_err(d, d4_ref) < 1e-5, max_err(d, d4_ref)
  assert max_err(per_device[0], s4_ref.weights) < 1e-5
  cost = collective_bytes(compiled)
  # Each device holds half of the params; the mean would all-reduce that
  # half over the 4 devices of 'data': 2 * 3/4 * 4 bytes * P/2.
  allreduce_blocks = 2 * (3 / 4) * 4 * (n_params / 2)
  out['shard_map_fsdp_ratio'] = cost['total'].sent_bytes / allreduce_blocks

  # 4. gram_matrix(param_axis_name=...): psum of the partial Grams.
  def gram_local(g):
    return grain_optax.gram_matrix(g, param_axis_name='model')[None]

  mesh2 = jax.make_mesh((D,), ('model',), axis_types=(AxisType.Auto,))
  gm = jax.jit(jax.shard_map(
      gram_local, mesh=mesh2,
      in_specs=({'w': P(None, None, 'model'), 'b': P(None, 'model'),
                 'c': P()},),
      out_specs=P('model')))(g)
  gm = np.asarray(gm)
  k_ref = np.asarray(grain_optax.gram_matrix(g))
  assert all(x.tobytes() == gm[0].tobytes() for x in gm)
  out['gram_rel_err'] = float(np.abs(gm[0] - k_ref).max() / np.abs(k_ref).max())
  assert out['gram_rel_err'] < 1e-5

  # 5. grain(param_axis_name=...) alone: groups on every device, blocks over
  #    'model'; the combined update stays in blocks.
  txp = grain_optax.grain(num_groups=m, param_axis_name='model')
  blocks = {'w': P(None, None, 'model'), 'b': P(None, 'model'), 'c': P()}

  def block_local(g):
    d, state = txp.update(g, txp.init(None))
    return d, state.weights[None]

  compiled = jax.jit(jax.shard_map(
      block_local, mesh=mesh2, in_specs=(blocks,),
      out_specs=({'w': P(None, 'model'), 'b': P('model'), 'c': P()},
                 P('model')))).lower(g).compile()
  d, per_device = compiled(g)
  per_device = np.asarray(per_device)
  assert all(r.tobytes() == per_device[0].tobytes() for r in per_device)
  assert max_err(d, d_ref) < 1e-5, max_err(d, d_ref)
  cost = collective_bytes(compiled)
  assert cost['total'].count == cost['all-reduce'].count, cost
  out['param_axis_bytes'] = cost['total'].sent_bytes
  return out


def case_apply():
  """apply= in both data-parallel forms, k = 1 and 2 groups per device."""
  params = init_params(0)
  batch = make_batch(3)
  mesh = jax.make_mesh((D,), ('data',), axis_types=(AxisType.Auto,))
  out = {}
  # 'grain_at_mean_length' takes the same path with other coefficients
  # (variants.coefficients, checked on one device in test_variants.py).
  for apply in ('mean', 'mean_at_grain_length'):
    for k in (1, 2):
      m = D * k
      ref_tx = grain_optax.grain(num_groups=m, apply=apply)

      @jax.jit
      def reference(params, batch, m=m, ref_tx=ref_tx):
        _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
        return ref_tx.update(grads, ref_tx.init(params), params)

      d_ref, s_ref = reference(params, batch)
      tx = grain_optax.grain(num_groups=m, axis_name='data', apply=apply)

      def step(params, batch, tx=tx, m=m):
        _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
        return tx.update(grads, tx.init(params), params)

      with jax.set_mesh(mesh):
        p = jax.device_put(params, NamedSharding(mesh, P()))
        b = jax.device_put(batch, NamedSharding(mesh, P('data')))
        d_jit, s_jit = jax.jit(step)(p, b)

      def local(params, batch, tx=tx, k=k):
        varying = jax.lax.pcast(params, 'data', to='varying')
        _, grads = grain_optax.group_value_and_grad(loss_fn, k)(varying, batch)
        return tx.update(grads, tx.init(params), params)

      d_sm, s_sm = jax.jit(jax.shard_map(
          local, mesh=mesh, in_specs=(P(), P('data')),
          out_specs=(P(), P())))(params, batch)
      for form, d, s in (('jit', d_jit, s_jit), ('shard_map', d_sm, s_sm)):
        err = max_err(d, d_ref)
        assert err < 1e-5, (apply, k, form, err)
        assert max_err(s.update_min_cosine, s_ref.update_min_cosine) < 1e-5
        out[f'{apply}_k{k}_{form}_err'] = err
      if apply == 'mean':
        mean = jax.jit(jax.grad(loss_fn))(params, batch)
        out[f'mean_k{k}_vs_grad'] = max_err(d_jit, mean)
        assert out[f'mean_k{k}_vs_grad'] < 1e-5, out
  return out


if __name__ == '__main__':
  case = sys.argv[1]
  result = {'jit': case_jit, 'shard_map': case_shard_map,
            'fsdp': case_fsdp, 'apply': case_apply}[case]()
  print('RESULT ' + json.dumps(result))
