"""Splitting a batch into groups and per-group gradients by ``vmap``."""

from typing import Any, Callable, Optional, Sequence, Union

import jax

from grain_optax._src import validation


def split_into_groups(batch: Any, num_groups: int) -> Any:
  """Splits every leaf of ``batch`` along axis 0 into ``num_groups`` groups.

  Args:
    batch: a pytree of arrays sharing the batch size ``B`` on axis 0.
    num_groups: the number of groups ``m``; must divide ``B``.

  Returns:
    The same tree with leaves reshaped ``[B, ...] -> [m, B // m, ...]``;
    group ``i`` holds examples ``i * B // m`` to ``(i + 1) * B // m - 1``.

  Raises:
    ValueError: if ``num_groups < 1``, a leaf is a scalar, or a leaf's batch
      size is not divisible by ``num_groups`` (the message names the leaf).

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> grain_optax.split_into_groups({'x': jnp.arange(6)}, 3)['x'].shape
    (3, 2)
  """
  _check_num_groups(num_groups)

  def split(path, leaf):
    shape = getattr(leaf, 'shape', ())
    if len(shape) == 0:
      raise ValueError(
          f'grain_optax: batch leaf {validation.leaf_name(path)} is a scalar; '
          'every batch leaf needs a batch axis 0 to split into groups.')
    if shape[0] % num_groups:
      raise ValueError(
          f'grain_optax: batch leaf {validation.leaf_name(path)} has batch '
          f'size {shape[0]} (shape {tuple(shape)}), which is not divisible by '
          f'num_groups={num_groups}.')
    return leaf.reshape((num_groups, shape[0] // num_groups) + tuple(shape[1:]))

  return jax.tree_util.tree_map_with_path(split, batch)


def _check_num_groups(num_groups):
  if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(
        f'grain_optax: num_groups must be an int >= 1, got {num_groups!r}.')


def group_value_and_grad(
    loss_fn: Callable[..., Any],
    num_groups: int,
    *,
    has_aux: bool = False,
    argnums: Union[int, Sequence[int]] = 0,
    batch_argnums: int = 1,
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
  r"""Per-group losses and gradients of ``loss_fn`` by ``vmap``.

  The batch argument (``args[batch_argnums]``) is split along axis 0 of every
  leaf into ``num_groups`` equal contiguous groups (:func:`split_into_groups`),
  and ``jax.value_and_grad(loss_fn)`` is mapped over the groups with every
  other argument shared. With ``loss_fn`` the mean loss of its batch, group
  :math:`i` gets :math:`L_i` and :math:`g_i = \nabla L_i`, and the mean of the
  :math:`g_i` is the ordinary full-batch gradient.

  Args:
    loss_fn: ``loss_fn(params, batch, *rest) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``); the loss must be a scalar.
    num_groups: the number of groups ``m >= 1``; must divide the batch size.
    has_aux: as in ``jax.value_and_grad``.
    argnums: the argument(s) to differentiate, as in ``jax.value_and_grad``.
    batch_argnums: the index of the argument to split into groups.
    chunk_size: if given, the groups run ``chunk_size`` at a time in sequence
      (``jax.lax.map`` with ``batch_size``), lowering activation memory;
      ``None`` maps all groups at once with ``vmap`` (fastest).

  Returns:
    A function with the signature of ``loss_fn`` returning
    ``(losses, grads)`` or ``((losses, aux), grads)``: ``losses`` is ``[m]``,
    ``aux`` and every leaf of ``grads`` have a leading group axis ``m``.

  Raises:
    ValueError: if ``num_groups < 1`` or ``chunk_size < 1``, or (when called)
      a batch leaf's size is not divisible by ``num_groups``.

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
  """
  _check_num_groups(num_groups)
  if chunk_size is not None and (
      not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(
        f'grain_optax: chunk_size must be None or an int >= 1, got '
        f'{chunk_size!r}.')
  diff_args = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  if batch_argnums in diff_args:
    raise ValueError(
        f'grain_optax: batch_argnums={batch_argnums} is also differentiated '
        f'(argnums={argnums}); the batch must be a separate argument.')
  value_and_grad = jax.value_and_grad(loss_fn, argnums=argnums,
                                      has_aux=has_aux)

  def wrapped(*args, **kwargs):
    if batch_argnums >= len(args):
      raise ValueError(
          f'grain_optax: batch_argnums={batch_argnums}, but only {len(args)} '
          'positional arguments were given.')
    groups = split_into_groups(args[batch_argnums], num_groups)

    def one_group(group_batch):
      group_args = list(args)
      group_args[batch_argnums] = group_batch
      return value_and_grad(*group_args, **kwargs)

    if chunk_size is None:
      return jax.vmap(one_group)(groups)
    return jax.lax.map(one_group, groups, batch_size=min(chunk_size, num_groups))

  return wrapped
