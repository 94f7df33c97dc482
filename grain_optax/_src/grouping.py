"""Splitting a batch into groups and per-group gradients by ``vmap``."""

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from grain_optax._src import backward_dtype
from grain_optax._src import reductions
from grain_optax._src import row_lookups
from grain_optax._src import validation


def split_into_groups(batch: Any, num_groups: int) -> Any:
  """Splits every leaf of ``batch`` along axis 0 into ``num_groups`` groups.

  Args:
    batch: a pytree of arrays sharing the batch size ``B`` on axis 0; a
      leaf may instead have ``num_groups`` entries on axis 0, one per group
      (e.g. a dropout key per group), each group then getting its own.
    num_groups: the number of groups ``m`` (a Python or NumPy int); must
      divide ``B``.

  Returns:
    The same tree with leaves reshaped ``[B, ...] -> [m, B // m, ...]``;
    group ``i`` holds examples ``i * B // m`` to ``(i + 1) * B // m - 1``.

  Raises:
    ValueError: if ``num_groups < 1``, a leaf is a scalar, two leaves differ
      in their size on axis 0 (other than leaves of ``num_groups``
      entries), or the batch size is not divisible by ``num_groups`` (the
      message names the leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> grain_optax.split_into_groups({'x': jnp.arange(6)}, 3)['x'].shape
    (3, 2)
  """
  num_groups = validation.check_num_groups(num_groups)
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  first = None  # The first per-example leaf's (path, shape): axis 0 is B.
  for path, leaf in leaves:
    shape = tuple(getattr(leaf, 'shape', ()))
    if not shape:
      raise ValueError(
          f'grain_optax: batch leaf {validation.leaf_name(path)} is a scalar; '
          'every batch leaf needs a batch axis 0 to split into groups.')
    if shape[0] == num_groups:
      continue  # B itself, or one entry per group: either way one per group.
    if first is None:
      first = (path, shape)
    elif shape[0] != first[1][0]:
      raise ValueError(
          f'grain_optax: batch leaf {validation.leaf_name(path)} has size '
          f'{shape[0]} on axis 0 (shape {shape}), but batch leaf '
          f'{validation.leaf_name(first[0])} has {first[1][0]} (shape '
          f'{first[1]}); every leaf of the batch must have the batch size B '
          f'on axis 0 (or num_groups={num_groups}, one entry per group), '
          'which is split into groups. Pass what is not per example (e.g. '
          'class weights) as another argument of loss_fn, outside '
          'batch_argnums, or close over it.')
    if shape[0] % num_groups:
      raise ValueError(
          f'grain_optax: batch leaf {validation.leaf_name(path)} has batch '
          f'size {shape[0]} (shape {shape}), which is not divisible by '
          f'num_groups={num_groups}.')

  def split(leaf):
    shape = leaf.shape
    return leaf.reshape((num_groups, shape[0] // num_groups) + tuple(shape[1:]))

  return jax.tree_util.tree_map(split, batch)


def batch_indices(batch_argnums: Any, caller: str) -> Tuple[int, ...]:
  """``batch_argnums`` (an int or a sequence of ints) as a tuple of ints."""
  many = isinstance(batch_argnums, (tuple, list))
  items = tuple(batch_argnums) if many else (batch_argnums,)
  out = []
  for i in items:
    if not validation.is_int_like(i) or i < 0:
      raise ValueError(
          f'{caller}: batch_argnums must be a non-negative int or a tuple of '
          f'them, got {batch_argnums!r}.')
    out.append(int(i))
  if not out or len(set(out)) != len(out):
    raise ValueError(
        f'{caller}: batch_argnums must name at least one argument, each '
        f'once; got {batch_argnums!r}.')
  return tuple(out)


def enough_positional(batch_idx: Sequence[int], batch_argnums: Any,
                      args: Sequence[Any], caller: str) -> None:
  """Checks that the call gave every argument ``batch_argnums`` names."""
  if max(batch_idx) >= len(args):
    raise ValueError(
        f'{caller}: batch_argnums={batch_argnums}, but only {len(args)} '
        'positional arguments were given.')


def with_batches(args: Sequence[Any], batch_idx: Sequence[int],
                 group_batches: Sequence[Any]) -> List[Any]:
  """``args`` with ``args[batch_idx[j]]`` replaced by ``group_batches[j]``."""
  group_args = list(args)
  for i, group_batch in zip(batch_idx, group_batches):
    group_args[i] = group_batch
  return group_args


def group_mask_of(example_mask: Callable[..., Any], batches: Sequence[Any],
                  num_groups: int, caller: str) -> jax.Array:
  """The ``[m]`` bool mask of groups holding at least one valid example.

  Raises:
    ValueError: if ``example_mask`` does not return shape ``[B]``, with ``B``
      the size of axis 0 of the batches' leaves.
  """
  mask = jnp.asarray(example_mask(*batches))
  sizes = [x.shape[0] for x in jax.tree_util.tree_leaves(list(batches))
           if getattr(x, 'shape', ())]
  # B: a leaf of num_groups entries may be one per group (split_into_groups).
  per_example = [s for s in sizes if s != num_groups] or sizes
  size = per_example[0] if per_example else None
  if (mask.ndim != 1 or mask.shape[0] % num_groups
      or (size is not None and mask.shape[0] != size)):
    of_batch = '' if size is None else f', but the batch has B = {size}'
    raise ValueError(
        f'{caller}: example_mask must return one value per example, shape '
        f'[B] with B divisible by num_groups={num_groups}; got shape '
        f'{mask.shape}{of_batch}.')
  return jnp.any(mask.reshape(num_groups, -1) != 0, axis=1)


def group_value_and_grad(
    loss_fn: Callable[..., Any],
    num_groups: int,
    *,
    has_aux: bool = False,
    argnums: Union[int, Sequence[int]] = 0,
    batch_argnums: Union[int, Sequence[int]] = 1,
    chunk_size: Optional[int] = None,
    example_mask: Optional[Callable[..., Any]] = None,
    grad_dtype: str = 'backward',
    split_sums: Union[bool, str] = 'auto',
    row_sparse: bool = False,
) -> Callable[..., Any]:
  r"""Per-group losses and gradients of ``loss_fn`` by ``vmap``.

  The batch argument (``args[batch_argnums]``, or each of them for a tuple) is
  split along axis 0 of every leaf into ``num_groups`` equal contiguous groups
  (:func:`split_into_groups`), and ``jax.value_and_grad(loss_fn)`` is mapped
  over the groups with every other argument shared. With ``loss_fn`` the mean
  loss of its batch, group
  :math:`i` gets :math:`L_i` and :math:`g_i = \nabla L_i`, and the mean of the
  :math:`g_i` is the ordinary full-batch gradient.

  Args:
    loss_fn: ``loss_fn(params, batch, *rest) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``); the loss must be a scalar.
    num_groups: the number of groups ``m >= 1``; must divide the batch size.
    has_aux: as in ``jax.value_and_grad``.
    argnums: the argument(s) to differentiate, as in ``jax.value_and_grad``.
    batch_argnums: the index of the argument to split into groups, or a
      tuple of indices (e.g. ``(1, 2)`` for ``loss_fn(params, x, y)``), each
      split the same way.
    chunk_size: if given, the groups run ``chunk_size`` at a time in sequence
      (``jax.lax.map`` with ``batch_size``), lowering activation memory;
      ``None`` maps all groups at once with ``vmap`` (fastest).
    example_mask: for padded batches, a function of the batch argument(s)
      returning a ``[B]`` per-example validity mask (e.g.
      ``lambda batch: batch['mask']``). The function made then also returns
      the ``[m]`` bool ``group_mask`` (True for groups with at least one
      valid example), to pass on as ``tx.update(grads, state, params,
      group_mask=group_mask)``: a group made only of padding has a zero
      gradient, which would make the GRAIN update zero.
    grad_dtype: ``'backward'`` (default): each gradient leaf in the dtype the
      backward pass produces it in, where that loses nothing: a float32
      parameter whose only use in ``loss_fn`` is one cast to a narrower float
      (``w.astype(jnp.bfloat16)``, as Flax layers with ``dtype=bfloat16``
      and ``param_dtype=float32`` do) has per-group gradients in that
      narrower dtype, since its float32 gradient is exactly their cast. The
      m gradients then take half the memory and bandwidth, and :func:`grain`
      forms the Gram matrix and the combination in float32 and returns the
      update in the params' dtype. A parameter used any other way (twice, as
      in tied embeddings, or in float32 arithmetic) keeps its own dtype.
      ``'params'``: every gradient leaf in its parameter's dtype, as
      ``jax.grad`` returns it.
    split_sums: with ``num_groups > 1``, each sum over the leading
      (example, token) axes in the per-group loss and backward pass, such as
      a bias or LayerNorm gradient, runs as 16 float32 partial sums and
      their sum: under ``vmap``, XLA's GPU code for the one-stage per-group
      sum runs at a fraction of the memory bandwidth
      (``benchmarks/RESULTS.md``, section 1e). ``'auto'`` (default): on
      where the step is traced for a GPU (``jax.default_backend() ==
      'gpu'``), off on CPUs and TPUs (CPU: section 1e, "On a CPU"); True or
      False force it on or off. Sums of at least 1024
      elements per group that keep at least 64 values are split, at the
      loss's top level, inside nested ``jax.jit`` and in the bodies of
      ``lax.scan`` (layers scanned over) and ``jax.checkpoint``; those
      inside ``custom_vjp``, ``cond`` or ``while_loop`` are left as they
      are. The gradients are the same up
      to float rounding (float32 accumulation); ``False`` runs the backward
      pass exactly as JAX traces it.
    row_sparse: give each differentiated leaf that ``loss_fn`` reads only by
      row lookups (``table[ids]``, ``jnp.take(table, ids, axis=0)``, looked
      through casts and ``jax.jit`` calls) its per-group gradient as a
      :class:`RowSparse` (the looked-up rows' gradients and their ids)
      instead of ``m`` dense tables, which :func:`grain` takes on one device
      (see :func:`nnx_group_value_and_grad`). Default False.

  Returns:
    A function with the signature of ``loss_fn`` returning
    ``(losses, grads)`` or ``((losses, aux), grads)``: ``losses`` is ``[m]``,
    ``aux`` and every leaf of ``grads`` have a leading group axis ``m``. With
    ``example_mask``, ``(losses, grads, group_mask)`` (or
    ``((losses, aux), grads, group_mask)``).

  Raises:
    ValueError: if ``num_groups < 1``, ``chunk_size < 1``,
      ``batch_argnums`` or ``grad_dtype`` is bad, or (when called) a batch
      leaf's size is not divisible by ``num_groups``.

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> def loss_fn(w, batch):
    ...   return jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> batch = {'x': jnp.ones((8, 3)), 'y': jnp.arange(8.)}
    >>> losses, grads = grain_optax.group_value_and_grad(loss_fn, 4)(
    ...     jnp.zeros(3), batch)
    >>> losses.shape, grads.shape
    ((4,), (4, 3))

    A padded batch whose last group holds only padding:

    >>> def masked_loss(w, batch):
    ...   err = (batch['x'] @ w - batch['y']) ** 2 * batch['mask']
    ...   return jnp.sum(err) / jnp.maximum(jnp.sum(batch['mask']), 1.0)
    >>> batch['mask'] = jnp.array([1., 1., 1., 1., 1., 1., 0., 0.])
    >>> losses, grads, group_mask = grain_optax.group_value_and_grad(
    ...     masked_loss, 4, example_mask=lambda b: b['mask'])(
    ...     jnp.zeros(3), batch)
    >>> group_mask.tolist()
    [True, True, True, False]
  """
  num_groups = validation.check_num_groups(num_groups)
  if chunk_size is not None:
    chunk_size = validation.positive_int(
        chunk_size, 'chunk_size', 'grain_optax', phrase='None or an int >= 1')
  batch_idx = batch_indices(batch_argnums, 'grain_optax')
  backward_dtype.check_grad_dtype(grad_dtype, 'grain_optax')
  diff_args = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  if set(batch_idx) & set(diff_args):
    raise ValueError(
        f'grain_optax: batch_argnums={batch_argnums} is also differentiated '
        f'(argnums={argnums}); the batch must be a separate argument.')
  value_and_grad = jax.value_and_grad(loss_fn, argnums=argnums,
                                      has_aux=has_aux)

  def with_diff(args, leaves, treedef):
    """``args`` (a list) with the differentiated ones rebuilt from leaves."""
    return with_batches(args, diff_args,
                        jax.tree_util.tree_unflatten(treedef, leaves))

  def narrowed_args(args, kwargs, groups):
    """``args`` with each losslessly narrowable leaf cast (see grad_dtype).

    Returns the new args and the differentiated leaves' own dtypes, or
    ``(args, None)`` when no leaf narrows.
    """
    leaves, treedef = jax.tree_util.tree_flatten(
        tuple(args[i] for i in diff_args))

    def loss_of(new_leaves):
      def one(group_batches):
        full = with_diff(with_batches(args, batch_idx, group_batches),
                         new_leaves, treedef)
        # The whole output, aux too: a parameter returned in aux is used
        # by more than its cast and keeps its dtype and value.
        return loss_fn(*full, **kwargs)
      return jax.vmap(one)(groups)

    narrow = backward_dtype.narrowed(loss_of, leaves)
    if narrow is None:
      return args, None
    dtypes = [jnp.result_type(x) for x in leaves]
    return tuple(with_diff(args, narrow, treedef)), (dtypes, treedef)

  def by_rows(loss, dense_grad_of):
    """``dense_grad_of`` with the tables read only by row lookups
    differentiated as rows (``RowSparse``; see ``row_lookups``)."""
    def grad_of(*args, **kwargs):
      leaves, treedef = jax.tree_util.tree_flatten(
          tuple(args[i] for i in diff_args))

      def pure(leaves):
        out = loss(*with_diff(args, leaves, treedef), **kwargs)
        return out if has_aux else (out, None)

      found = row_lookups.value_and_grad(pure, leaves)
      if found is None:
        return dense_grad_of(*args, **kwargs)
      (value, aux), grads = found
      grads = jax.tree_util.tree_unflatten(treedef, grads)
      if isinstance(argnums, int):
        grads = grads[0]
      return ((value, aux) if has_aux else value), grads
    return grad_of

  def wrapped(*args, **kwargs):
    enough_positional(batch_idx, batch_argnums, args, 'grain_optax')
    groups = tuple(split_into_groups(args[i], num_groups) for i in batch_idx)
    wide = None
    if grad_dtype == 'backward':
      args, wide = narrowed_args(args, kwargs, groups)
    grad_of, this_loss = value_and_grad, loss_fn
    if wide is not None:
      # Differentiate the narrow copies, but run the loss on them cast back
      # to the params' own dtypes: the loss computes exactly what it
      # computes on the params (see backward_dtype).
      dtypes, treedef = wide

      def loss_on_wide(*full, **kw):
        leaves = jax.tree_util.tree_leaves(tuple(full[i] for i in diff_args))
        full = with_diff(full, backward_dtype.widened(leaves, dtypes),
                         treedef)
        return loss_fn(*full, **kw)

      grad_of = jax.value_and_grad(loss_on_wide, argnums=argnums,
                                   has_aux=has_aux)
      this_loss = loss_on_wide
    if row_sparse:
      grad_of = by_rows(this_loss, grad_of)

    def one_group(group_batches):
      return grad_of(*with_batches(args, batch_idx, group_batches), **kwargs)

    if reductions.use_split_sums(split_sums) and num_groups > 1:
      one_group = reductions.split_leading_sums(one_group)

    if chunk_size is None:
      out = jax.vmap(one_group)(groups)
    else:
      out = jax.lax.map(one_group, groups,
                        batch_size=min(chunk_size, num_groups))
    if example_mask is None:
      return out
    mask = group_mask_of(example_mask, [args[i] for i in batch_idx],
                         num_groups, 'grain_optax.group_value_and_grad')
    return out + (mask,)

  return wrapped
