"""Row-sparse per-group gradients of lookup tables (RowSparse).

What a user relies on: a table's per-group gradient kept as its looked-up
rows gives the same Gram matrix, weights and update as the dense per-group
tables; nnx_group_value_and_grad(row_sparse=True) makes them for the tables
the loss reads only by row lookups, and only for those.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import grain_optax
from grain_optax._src import row_sparse

M, N, V, D = 4, 6, 10, 3


def _sparse_and_dense(seed=0, nan_group=None):
  rng = np.random.default_rng(seed)
  # Ids out of range on both sides, and ids shared between groups.
  ids = rng.integers(-2, V + 2, (M, N)).astype(np.int32)
  ids[:, 0] = 3
  rows = rng.normal(size=(M, N, D)).astype(np.float32)
  if nan_group is not None:
    rows[nan_group, 1] = np.nan
    ids[nan_group, 1] = 5
  dense = np.zeros((M, V, D), np.float64)
  for g in range(M):
    for t in range(N):
      if 0 <= ids[g, t] < V:
        dense[g, ids[g, t]] += rows[g, t]
  return row_sparse.RowSparse(jnp.asarray(ids), jnp.asarray(rows), V), dense


def test_gram_and_tables_match_the_dense_tables():
  sparse, dense = _sparse_and_dense()
  np.testing.assert_allclose(row_sparse.densify(sparse), dense, atol=1e-6)
  reference = np.einsum('gvd,hvd->gh', dense, dense)
  np.testing.assert_allclose(grain_optax.gram_matrix({'e': sparse}),
                             reference, rtol=1e-6, atol=1e-5)
  w = jnp.array([0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(
      grain_optax.combine({'e': sparse}, w)['e'],
      np.einsum('g,gvd->vd', np.asarray(w, np.float64), dense), atol=1e-6)


@pytest.mark.parametrize('apply', ['grain', 'mean', 'mean_at_grain_length',
                                   'grain_at_mean_length'])
def test_grain_matches_the_dense_tables(apply):
  sparse, dense = _sparse_and_dense(1)
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(M, 5)).astype(np.float32))
  params = {'emb': jnp.zeros((V, D)), 'w': jnp.zeros(5)}
  tx = grain_optax.grain(num_groups=M, apply=apply)
  got, got_state = jax.jit(tx.update)({'emb': sparse, 'w': w},
                                      tx.init(params), params)
  want, want_state = tx.update({'emb': jnp.asarray(dense, jnp.float32),
                                'w': w}, tx.init(params), params)
  np.testing.assert_allclose(got_state.weights, want_state.weights,
                             atol=1e-6)
  for k in params:
    assert got[k].shape == params[k].shape
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_grain_mask_dtype_and_non_finite_group():
  sparse, dense = _sparse_and_dense(3, nan_group=2)
  params = {'emb': jnp.zeros((V, D), jnp.bfloat16), 'w': jnp.zeros(2)}
  w = jnp.ones((M, 2))
  tx = grain_optax.grain(num_groups=M)
  out, state = tx.update({'emb': sparse, 'w': w}, tx.init(params), params)
  assert out['emb'].dtype == jnp.bfloat16  # the param's dtype
  assert int(state.num_nonfinite) == 1 and float(state.weights[2]) == 0.0
  assert bool(jnp.all(jnp.isfinite(out['emb'].astype(jnp.float32))))
  # Left out by mask: a zero update of the table's shape.
  tx = grain_optax.grain(mask={'emb': False, 'w': True})
  out, _ = tx.update({'emb': sparse, 'w': w}, tx.init(params), params)
  assert out['emb'].shape == (V, D) and not bool(jnp.any(out['emb']))


def test_bad_row_sparse_leaves_are_named():
  good, _ = _sparse_and_dense()
  params = {'emb': jnp.zeros((V, D))}
  tx = grain_optax.grain()
  bad = row_sparse.RowSparse(good.ids[:, :2], good.rows, V)
  with pytest.raises(ValueError, match=r"\['emb'\].*rows have shape"):
    tx.update({'emb': bad}, tx.init(params), params)
  wrong_rows = row_sparse.RowSparse(good.ids, good.rows, V + 1)
  with pytest.raises(ValueError, match=r"\['emb'\].*\(4, 11, 3\)"):
    tx.update({'emb': wrong_rows}, tx.init(params), params)
  with pytest.raises(ValueError, match='one device'):
    grain_optax.grain(axis_name='groups').update(
        {'emb': good}, tx.init(params), params)
  with pytest.raises(ValueError, match='RowSparse'):
    grain_optax.min_norm_point({'emb': good})


class _Model(nnx.Module):

  def __init__(self, dtype, tied=False, *, rngs):
    self.emb = nnx.Embed(50, 8, dtype=dtype, rngs=rngs)
    self.pos = nnx.Embed(6, 8, dtype=dtype, rngs=rngs)
    self.lin = nnx.Linear(8, 3, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.tied = tied

  def __call__(self, ids):
    x = self.emb(ids) + self.pos(jnp.arange(ids.shape[-1]))
    x = self.drop(x).mean(1)
    if self.tied:  # the table used a second way: its gradient stays dense
      x = x + 0.1 * self.emb.attend(x)[:, :8]
    return self.lin(x)


def _loss(model, batch):
  logits = model(batch['ids']).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']).mean()


def _batch():
  rng = np.random.default_rng(0)
  return {'ids': jnp.asarray(rng.integers(0, 50, (8, 6))),
          'y': jnp.asarray(rng.integers(0, 3, 8))}


@pytest.mark.parametrize('dtype,grad_dtype', [
    (jnp.float32, 'backward'), (jnp.bfloat16, 'backward'),
    (jnp.bfloat16, 'params')])
def test_nnx_row_sparse_gradients_and_step(dtype, grad_dtype):
  batch = _batch()
  dense_model = _Model(dtype, rngs=nnx.Rngs(0))
  sparse_model = _Model(dtype, rngs=nnx.Rngs(0))
  losses, dense = nnx.jit(grain_optax.nnx_group_value_and_grad(
      _loss, 4, grad_dtype=grad_dtype))(dense_model, batch)
  sparse_losses, sparse = nnx.jit(grain_optax.nnx_group_value_and_grad(
      _loss, 4, grad_dtype=grad_dtype, row_sparse=True))(sparse_model, batch)
  np.testing.assert_array_equal(losses, sparse_losses)  # dropout included
  for name in ('emb', 'pos'):
    table = sparse[name]['embedding'].get_value()
    assert isinstance(table, grain_optax.RowSparse), name
    want = dense[name]['embedding'].get_value()
    assert table.rows.dtype == want.dtype
    # The dense backward sums repeated ids in the compute dtype, the rows
    # are summed in float32.
    tol = 1e-6 if dtype == jnp.float32 and want.dtype == jnp.float32 else 2e-3
    np.testing.assert_allclose(
        np.asarray(row_sparse.densify(table), np.float32),
        np.asarray(want, np.float32), atol=tol)
  np.testing.assert_array_equal(sparse['lin']['kernel'].get_value(),
                                dense['lin']['kernel'].get_value())
  tx = optax.chain(grain_optax.grain(num_groups=4), optax.adamw(1e-2))
  for model, grads in ((dense_model, dense), (sparse_model, sparse)):
    nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)
  for a, b in zip(jax.tree.leaves(nnx.state(dense_model, nnx.Param)),
                  jax.tree.leaves(nnx.state(sparse_model, nnx.Param))):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), atol=1e-6)


def test_nnx_tied_table_stays_dense():
  _, grads = grain_optax.nnx_group_value_and_grad(_loss, 2, row_sparse=True)(
      _Model(jnp.float32, tied=True, rngs=nnx.Rngs(0)), _batch())
  assert not isinstance(grads['emb']['embedding'].get_value(),
                        grain_optax.RowSparse)
  assert isinstance(grads['pos']['embedding'].get_value(),
                    grain_optax.RowSparse)


def test_clamped_lookups_take_the_clamped_rows():
  table = jnp.arange(12.0).reshape(6, 2)

  def loss(model, batch):
    rows = jnp.take(model.table[...], batch, axis=0, mode='clip')
    return jnp.sum(rows ** 2)

  class Holder(nnx.Module):
    def __init__(self):
      self.table = nnx.Param(table)

  ids = jnp.array([[0, 9], [-3, 5]])  # 9 -> 5, -3 -> 0 under clip
  _, dense = grain_optax.nnx_group_value_and_grad(loss, 2)(Holder(), ids)
  _, sparse = grain_optax.nnx_group_value_and_grad(loss, 2, row_sparse=True)(
      Holder(), ids)
  got = sparse['table'].get_value()
  assert isinstance(got, grain_optax.RowSparse)
  np.testing.assert_allclose(row_sparse.densify(got),
                             dense['table'].get_value())


def test_group_value_and_grad_row_sparse_with_chunks():
  rng = np.random.default_rng(4)
  params = {'table': jnp.asarray(rng.normal(size=(20, 4)), jnp.float32),
            'w': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  batch = jnp.asarray(rng.integers(0, 20, (6, 5)))

  def loss(p, ids):
    return jnp.mean(jnp.tanh(p['table'][ids] @ p['w']))

  for chunk in (None, 2):
    losses, dense = grain_optax.group_value_and_grad(
        loss, 3, chunk_size=chunk)(params, batch)
    sparse_losses, sparse = grain_optax.group_value_and_grad(
        loss, 3, chunk_size=chunk, row_sparse=True)(params, batch)
    np.testing.assert_allclose(sparse_losses, losses, rtol=1e-6)
    assert isinstance(sparse['table'], grain_optax.RowSparse)
    np.testing.assert_allclose(row_sparse.densify(sparse['table']),
                               dense['table'], atol=1e-6)
    np.testing.assert_allclose(sparse['w'], dense['w'], rtol=1e-6)
