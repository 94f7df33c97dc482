"""A tiny resumable training run for the checkpoint and determinism tests.

Digits, a 64-32-10 MLP with dropout, GRAIN within batches (4 groups) and
across them (``accumulate``, 3 micro-batches per AdamW step), in Flax NNX
(``nnx.Optimizer``) or Linen (``TrainState``). The micro-batch of step ``i``
depends only on ``i``, so a run restored at step ``s`` sees the same data as
an uninterrupted one.

Imported by tests/test_checkpoint.py, and run as a script in a fresh process:

    python tests/_resumable_training.py --api nnx --steps 8 --save-at 4 --save DIR --out A.npz
    python tests/_resumable_training.py --api nnx --restore DIR --steps 8 --out B.npz

The first trains 8 micro-batches, checkpointing to DIR after 4; the second
restores DIR and trains up to ``--steps``. Each writes every array of the
state it started from (``restored:``), of the state it saved (``saved:``) and
of the final one (``final:``) to its FILE.npz; with ``--control``, also
the final state of a second continuation whose accumulate buffer was emptied
after restoring (``control:``). ``--device I`` puts the whole
run on device I (with ``XLA_FLAGS=--xla_force_host_platform_device_count``),
so a checkpoint can be written on devices the restoring process lacks.
"""

import argparse
import pathlib

import flax.linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

import grain_optax

APIS = ('nnx', 'linen')
BATCH, GROUPS, EVERY_K, HIDDEN = 32, 4, 3, 32
TX = optax.chain(
    grain_optax.grain(num_groups=GROUPS),
    grain_optax.accumulate(optax.adamw(1e-2), every_k=EVERY_K))


def _data():
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(0).permutation(len(x))
  return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)


_X, _Y = _data()


def batch(step):
  start = (step * BATCH) % (len(_X) - BATCH)
  return {'x': _X[start:start + BATCH], 'y': _Y[start:start + BATCH]}


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --- Flax NNX ------------------------------------------------------------

class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jax.nn.relu(self.hidden(x))))


_NNX_GRADS = grain_optax.nnx_group_value_and_grad(
    lambda model, b: _xent(model(b['x']), b['y']), GROUPS)


@nnx.jit
def _nnx_step(model, optimizer, b):
  _, grads = _NNX_GRADS(model, b)
  optimizer.update(model, grads)


def _nnx_new(seed):
  model = NnxMLP(nnx.Rngs(seed))
  return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


# --- Flax Linen ----------------------------------------------------------

class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.relu(nn.Dense(HIDDEN)(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(x)


def _linen_loss(params, b, apply_fn):
  logits = apply_fn({'params': params}, b['x'], True,
                    rngs={'dropout': b['key'][0]})
  return _xent(logits, b['y'])


_LINEN_GRADS = grain_optax.group_value_and_grad(_linen_loss, GROUPS)


@jax.jit
def _linen_step(state, b, seed):
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  b = dict(b, key=jax.random.split(key, GROUPS))
  _, grads = _LINEN_GRADS(state.params, b, state.apply_fn)
  return state.apply_gradients(grads=grads)


_LINEN_MODEL = LinenMLP()  # one instance: equal apply_fn, no re-tracing


def _linen_new(seed):
  params = _LINEN_MODEL.init(jax.random.key(seed), jnp.zeros((1, 64)),
                             False)['params']
  return train_state.TrainState.create(apply_fn=_LINEN_MODEL.apply,
                                       params=params, tx=TX)


# --- A run of either API -------------------------------------------------

class Run:
  """Training state of one run, with train / save / restore / arrays."""

  def __init__(self, api, seed=0):
    if api not in APIS:
      raise ValueError(f'api must be one of {APIS}, got {api!r}')
    self.api, self.seed = api, seed
    if api == 'nnx':
      self.model, self.optimizer = _nnx_new(seed)
    else:
      self.state = _linen_new(seed)

  @property
  def step(self):
    if self.api == 'nnx':
      return int(self.optimizer.step[...])
    return int(self.state.step)

  @property
  def opt_state(self):
    if self.api == 'nnx':
      return jax.tree_util.tree_map(
          lambda v: v.get_value(), self.optimizer.opt_state,
          is_leaf=lambda x: isinstance(x, nnx.Variable))
    return self.state.opt_state

  def train(self, until):
    """Trains on micro-batches self.step .. until - 1."""
    for i in range(self.step, until):
      if self.api == 'nnx':
        _nnx_step(self.model, self.optimizer, batch(i))
      else:
        self.state = _linen_step(self.state, batch(i), self.seed)
    return self

  def _tree(self):
    if self.api == 'nnx':
      return nnx.state((self.model, self.optimizer))
    return self.state

  def save(self, path):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(pathlib.Path(path).resolve(), self._tree())
    checkpointer.wait_until_finished()

  @classmethod
  def restore(cls, api, path, seed=0):
    """A fresh run (as in a new process) with the state read from ``path``.

    Whatever devices the checkpoint was written from, the state lands on this
    process's default device: every leaf of the abstract target names that
    device (a leaf without a sharding would be placed as it was saved, and
    orbax fails with "Topology mismatch" where those devices do not exist).
    """
    run = cls(api, seed)
    checkpointer = ocp.StandardCheckpointer()
    path = pathlib.Path(path).resolve()
    if api == 'nnx':
      graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _nnx_new(seed)))
      run.model, run.optimizer = nnx.merge(
          graphdef, checkpointer.restore(path, on_default_device(abstract)))
    else:
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                        run.state)
      run.state = checkpointer.restore(path, abstract)
    return run

  def empty_buffer(self):
    """Zeroes the gradients stored in the accumulate buffer (a control)."""
    if self.api == 'nnx':
      acc = self.optimizer.opt_state[1]
      for var in jax.tree_util.tree_leaves(
          acc.buffer, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var.set_value(var.get_value() * 0)
    else:
      acc = self.state.opt_state[1]
      empty = jax.tree_util.tree_map(lambda b: b * 0, acc.buffer)
      self.state = self.state.replace(opt_state=(
          self.state.opt_state[0], acc._replace(buffer=empty)))
    return self

  def arrays(self):
    """Every array of the training state (params, optimizer, RNG), by path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(self._tree())[0]:
      leaf = jnp.asarray(leaf)
      if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def on_default_device(abstract):
  """``abstract`` (a tree of ShapeDtypeStructs) placed on the default device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      abstract)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--api', choices=APIS, required=True)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--restore', default=None, help='checkpoint to resume')
  parser.add_argument('--steps', type=int, required=True)
  parser.add_argument('--save-at', type=int, default=None)
  parser.add_argument('--save', default=None, help='checkpoint to write')
  parser.add_argument('--device', type=int, default=0,
                      help='index of the device to run on')
  parser.add_argument('--control', action='store_true',
                      help='also continue from the restored state with the '
                      'accumulate buffer emptied (control:)')
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  with jax.default_device(jax.devices()[args.device]):
    if args.restore:
      run = Run.restore(args.api, args.restore, args.seed)
    else:
      run = Run(args.api, args.seed)
    arrays = {f'restored:{k}': v for k, v in run.arrays().items()}
    if args.save:
      run.train(args.save_at)
      run.save(args.save)
      arrays.update({f'saved:{k}': v for k, v in run.arrays().items()})
      first = jax.tree_util.tree_leaves(run._tree())[0]  # pylint: disable=protected-access
      arrays['saved_on'] = np.asarray(str(first.sharding))
    run.train(args.steps)
    arrays.update({f'final:{k}': v for k, v in run.arrays().items()})
    if args.control:
      control = Run.restore(args.api, args.restore, args.seed).empty_buffer()
      control.train(args.steps)
      arrays.update({f'control:{k}': v for k, v in control.arrays().items()})
  np.savez(args.out, **arrays)


if __name__ == '__main__':
  main()
