"""GRAIN in Flax: NNX (nnx.Optimizer) and Linen (TrainState), and the examples."""

import re

import chex
import flax.linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grain_optax
from _asserts import load_example

M = 4


@pytest.fixture(autouse=True)
def _float32_matmuls():
  # The comparisons below need float32 matmuls in the losses; GPUs default to
  # TF32 (about 1e-3 relative error), which the two routes round differently.
  with jax.default_matmul_precision('highest'):
    yield


class Net(nnx.Module):

  def __init__(self, rngs, dropout=0.0):
    self.hidden = nnx.Linear(5, 6, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.tanh(self.hidden(x))
    if self.dropout is not None:
      h = self.dropout(h)
    return self.out(h)


def loss_fn(model, batch):
  logits = model(batch['x'])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']).mean()


def make_batch(seed=0, size=16):
  rng = np.random.default_rng(seed)
  return {'x': jnp.asarray(rng.normal(size=(size, 5)), jnp.float32),
          'y': jnp.asarray(rng.integers(0, 3, size=size), jnp.int32)}


def group_slice(batch, i, m=M):
  n = batch['x'].shape[0] // m
  return jax.tree_util.tree_map(lambda x: x[i * n:(i + 1) * n], batch)


def test_nnx_group_grads_are_the_gradients_of_each_group():
  model = Net(nnx.Rngs(0))
  batch = make_batch()
  losses, grads = jax.jit(
      lambda m, b: grain_optax.nnx_group_value_and_grad(loss_fn, M)(m, b))(
          model, batch)
  assert losses.shape == (M,)
  one_group = nnx.jit(nnx.value_and_grad(loss_fn))
  for i in range(M):
    loss_i, grad_i = one_group(model, group_slice(batch, i))
    np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda g: g[i], nnx.to_pure_dict(grads)),
        nnx.to_pure_dict(grad_i), rtol=1e-5, atol=1e-6)
  # The other route: group_value_and_grad on nnx.split state gives the same.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b)
  losses2, grads2 = grain_optax.group_value_and_grad(pure, M)(params, batch)
  np.testing.assert_allclose(losses, losses2, rtol=1e-6)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads),
                              nnx.to_pure_dict(grads2), rtol=1e-6, atol=1e-7)


def test_nnx_has_aux_and_shared_extra_args():
  model = Net(nnx.Rngs(1))
  batch = make_batch(1)

  def scaled_loss(model, batch, scale):
    logits = model(batch['x'])
    return scale * loss_fn(model, batch), jnp.argmax(logits, -1)

  (losses, preds), grads = grain_optax.nnx_group_value_and_grad(
      scaled_loss, M, has_aux=True)(model, batch, 2.0)
  assert preds.shape == (M, 4)
  _, plain = grain_optax.nnx_group_value_and_grad(loss_fn, M)(model, batch)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads),
                              jax.tree_util.tree_map(lambda g: 2 * g,
                                                     nnx.to_pure_dict(plain)),
                              rtol=1e-6)
  np.testing.assert_allclose(losses / 2, [loss_fn(model, group_slice(batch, i))
                                          for i in range(M)], rtol=1e-5)


def test_nnx_dropout_each_group_draws_its_own_mask_and_rngs_advance():
  model = Net(nnx.Rngs(0), dropout=0.5)
  one = make_batch(2, size=4)
  same = jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * M), one)
  count = lambda: int(model.dropout.rngs.count[...])
  before = count()
  fn = nnx.jit(grain_optax.nnx_group_value_and_grad(loss_fn, M))
  losses, _ = fn(model, same)
  # Identical data in every group: only the dropout masks differ.
  assert len(np.unique(np.asarray(losses))) == M
  assert count() == before + 1
  losses_again, _ = fn(model, same)
  assert not np.array_equal(losses, losses_again)
  model.eval()
  eval_losses, _ = fn(model, same)
  np.testing.assert_allclose(eval_losses, eval_losses[0], rtol=1e-6)


class _Bf16Net(nnx.Module):
  """bf16 matmuls on float32 params (l1), dropout, a float32 head."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                         rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(self.l1(x)).astype(jnp.float32))


def test_nnx_backward_dtype_narrows_bf16_layers_losslessly():
  def loss_fn(model, batch):
    return jnp.mean((model(batch['x'])[:, 0] - batch['y']) ** 2)

  batch = {'x': jax.random.normal(jax.random.key(0), (8, 4)),
           'y': jnp.arange(8.0)}
  out = {}
  for grad_dtype in ('backward', 'params'):
    model = _Bf16Net(nnx.Rngs(0, dropout=1))
    grad_fn = nnx.jit(grain_optax.nnx_group_value_and_grad(
        loss_fn, 4, grad_dtype=grad_dtype))
    first, _ = grad_fn(model, batch)
    losses, grads = grad_fn(model, batch)  # RNG streams have advanced.
    out[grad_dtype] = (first, losses, grads, model)
  (first, losses, grads, model), ref = out['backward'], out['params']
  assert grads['l1']['kernel'].dtype == jnp.bfloat16
  assert grads['l1']['bias'].dtype == jnp.bfloat16
  assert grads['l2']['kernel'].dtype == jnp.float32
  # Same losses and the same dropout masks, call after call, as the float32
  # path; the gradients are the same numbers.
  np.testing.assert_array_equal(first, ref[0])
  np.testing.assert_array_equal(losses, ref[1])
  assert not np.array_equal(first, losses)
  chex.assert_trees_all_close(
      jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads), ref[2],
      rtol=0 if jax.default_backend() == 'cpu' else 2 ** -7, atol=1e-7)
  optimizer = nnx.Optimizer(
      model, optax.chain(grain_optax.grain(num_groups=4), optax.adamw(1e-2)),
      wrt=nnx.Param)
  optimizer.update(model, grads)
  assert model.l1.kernel[...].dtype == jnp.float32


class _ReadsDtype(nnx.Module):
  """A bf16-compute layer whose output goes back to its param's dtype."""

  def __init__(self, rngs):
    self.w = nnx.Param(
        jax.random.normal(rngs.params(), (16, 10)).at[0, 0].set(1.0009765625))
    self.drop = nnx.Dropout(0.25, rngs=rngs)

  def __call__(self, x):
    w = self.w[...]
    h = (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(w.dtype)
    return self.drop(h + (1.0 if w.dtype == jnp.float32 else 0.0))


@pytest.mark.parametrize('with_aux', [False, True])
def test_nnx_backward_dtype_keeps_losses_that_read_the_dtype(with_aux):
  def loss_fn(model, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(
        model(batch['x']), batch['y']).mean()
    return (loss, {'w': model.w[...]}) if with_aux else loss

  rng = np.random.default_rng(0)
  batch = {'x': jnp.asarray(rng.normal(size=(16, 16)) * 3, jnp.float32),
           'y': jnp.asarray(rng.integers(0, 10, 16))}
  out = {}
  for grad_dtype in ('backward', 'params'):
    model = _ReadsDtype(nnx.Rngs(0, dropout=1))
    grad_fn = nnx.jit(grain_optax.nnx_group_value_and_grad(
        loss_fn, 4, has_aux=with_aux, grad_dtype=grad_dtype))
    first, _ = grad_fn(model, batch)
    second, grads = grad_fn(model, batch)  # RNG streams have advanced.
    out[grad_dtype] = (first, second, grads)
  (first, second, grads), ref = out['backward'], out['params']
  chex.assert_trees_all_equal(first, ref[0])
  chex.assert_trees_all_equal(second, ref[1])
  if with_aux:
    assert grads['w'].dtype == jnp.float32       # returned in aux: kept
    np.testing.assert_array_equal(second[1]['w'][:, 0, 0],
                                  np.full(4, 1.0009765625))
  else:
    assert grads['w'].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(grads['w'], np.float32), np.asarray(ref[2]['w']),
      rtol=0 if jax.default_backend() == 'cpu' else 2 ** -7, atol=1e-7)


def test_nnx_optimizer_step_is_grain_then_the_inner_optimizer():
  model = Net(nnx.Rngs(3))
  batch = make_batch(3)
  params0 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optax.chain(grain_optax.grain(num_groups=M), optax.adamw(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    _, grads = grain_optax.nnx_group_value_and_grad(loss_fn, M)(model, batch)
    optimizer.update(model, grads)
    return grads

  grads = step(model, optimizer, batch)
  # The same step in plain optax on arrays.
  g = nnx.to_pure_dict(grads)
  updates, ref_state = jax.jit(tx.update)(g, tx.init(params0), params0)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                              optax.apply_updates(params0, updates),
                              rtol=1e-6, atol=1e-7)
  stats = grain_optax.grain_statistics(optimizer.opt_state)
  np.testing.assert_allclose(stats['grain'].weights, ref_state[0].weights,
                             rtol=1e-6)
  assert float(stats['grain'].min_cosine) >= -1e-6


def test_nnx_optimizer_with_accumulate_moves_only_every_k():
  model = Net(nnx.Rngs(4))
  tx = optax.chain(grain_optax.grain(num_groups=M),
                   grain_optax.accumulate(optax.adamw(1e-2), every_k=3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  fn = grain_optax.nnx_group_value_and_grad(loss_fn, M)

  @nnx.jit
  def step(model, optimizer, batch):
    _, grads = fn(model, batch)
    optimizer.update(model, grads)

  snapshots = [nnx.to_pure_dict(nnx.state(model, nnx.Param))]
  for i in range(6):
    step(model, optimizer, make_batch(10 + i))
    snapshots.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  moved = [not all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))
           for x, y in zip(snapshots, snapshots[1:])]
  assert moved == [False, False, True, False, False, True]
  stats = grain_optax.grain_statistics(optimizer.opt_state)
  assert int(stats['accumulate'].count) == 2 and int(stats['grain'].count) == 6


def test_nnx_wrt_filter_selects_what_is_differentiated():

  class Frozen(nnx.Variable):
    pass

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(5, 3, rngs=rngs)
      self.offset = Frozen(jnp.ones(3))

    def __call__(self, x):
      return self.linear(x) + self.offset[...]

  model = Model(nnx.Rngs(0))
  _, grads = grain_optax.nnx_group_value_and_grad(loss_fn, M)(model, make_batch())
  assert set(nnx.to_pure_dict(grads)) == {'linear'}
  _, all_grads = grain_optax.nnx_group_value_and_grad(
      loss_fn, M, wrt=nnx.Any(nnx.Param, Frozen))(model, make_batch())
  assert nnx.to_pure_dict(all_grads)['offset'].shape == (M, 3)


def test_nnx_errors_are_clear():
  model = nnx.Sequential(nnx.Linear(5, 6, rngs=nnx.Rngs(0)),
                         nnx.BatchNorm(6, rngs=nnx.Rngs(0)),
                         nnx.Linear(6, 3, rngs=nnx.Rngs(0)))
  fn = grain_optax.nnx_group_value_and_grad(loss_fn, M)
  with pytest.raises(ValueError, match='BatchNorm.*model.eval'):
    fn(model, make_batch())
  model.eval()
  losses, _ = fn(model, make_batch())
  assert losses.shape == (M,)
  with pytest.raises(ValueError, match=r"\['x'\].*not divisible"):
    fn(model, make_batch(size=10))
  with pytest.raises(ValueError, match='num_groups'):
    grain_optax.nnx_group_value_and_grad(loss_fn, 0)


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


def test_linen_train_state_takes_per_group_gradients():
  model = LinenNet()
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))['params']
  tx = optax.chain(grain_optax.grain(num_groups=M),
                   grain_optax.accumulate(optax.adamw(1e-2), every_k=2))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)

  def linen_loss(params, batch):
    logits = model.apply({'params': params}, batch['x'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y']).mean()

  @jax.jit
  def step(state, batch):
    losses, grads = grain_optax.group_value_and_grad(linen_loss, M)(
        state.params, batch)
    return state.apply_gradients(grads=grads), losses

  batches = [make_batch(20), make_batch(21)]
  state1, _ = step(state, batches[0])
  chex.assert_trees_all_equal(state1.params, params)  # first of two: held
  state2, _ = step(state1, batches[1])
  # The same two steps in plain optax.
  ref_state = tx.init(params)

  @jax.jit
  def ref_step(b, ref_state):
    _, g = grain_optax.group_value_and_grad(linen_loss, M)(params, b)
    return tx.update(g, ref_state, params)

  for b in batches:
    updates, ref_state = ref_step(b, ref_state)
  chex.assert_trees_all_close(state2.params,
                              optax.apply_updates(params, updates),
                              rtol=1e-6, atol=1e-7)
  stats = grain_optax.grain_statistics(state2.opt_state)
  assert list(stats) == ['grain', 'accumulate']
  assert int(stats['accumulate'].count) == 1
  assert float(stats['accumulate'].min_cosine) >= -1e-6


@pytest.mark.parametrize('name', ['flax_nnx', 'flax_linen'])
def test_example_trains_digits_in_reduced_mode(name, capsys):
  example = load_example(name)
  accuracy = example.main(['--steps', '120', '--log-every', '40',
                           '--checkpoint-dir', 'tmp'])
  out = capsys.readouterr()
  # 60 AdamW steps on digits: far above chance (0.1).
  assert accuracy > 0.8, out.out
  assert re.search(r'optimizer steps: 60 ', out.out), out.out
  assert 'identical: True' in out.out, out.out
  assert 'batch' in out.err  # the tqdm progress bar


def test_nnx_split_sums_gives_the_one_stage_gradients():
  # 4 groups of 1024 examples: each group's bias sums run in two stages.
  class Wide(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 96, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)
      self.l2 = nnx.Linear(96, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.drop(jax.nn.tanh(self.l1(x))))

  batch = make_batch(3, size=4096)
  grads = {}
  for split in (True, False):
    model = Wide(nnx.Rngs(0))
    fn = nnx.jit(grain_optax.nnx_group_value_and_grad(loss_fn, M,
                                                      split_sums=split))
    losses, g = fn(model, batch)
    grads[split] = (losses, g, int(model.drop.rngs.count[...]))
  np.testing.assert_array_equal(grads[True][0], grads[False][0])
  assert grads[True][2] == grads[False][2] == 1  # the RNG stream advanced
  chex.assert_trees_all_close(grads[True][1], grads[False][1], rtol=1e-5,
                              atol=1e-7)
  graphdef, state = nnx.split(Wide(nnx.Rngs(0)))
  fn = grain_optax.nnx_group_value_and_grad(loss_fn, M, split_sums=True)
  jaxpr = jax.make_jaxpr(lambda s: fn(nnx.merge(graphdef, s), batch))(state)
  assert 'optimization_barrier' in str(jaxpr)
