"""Per-group gradients of Flax NNX modules, for :func:`grain`.

Flax is imported only inside :func:`nnx_group_value_and_grad`, so the rest of
the package never needs it.
"""

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from grain_optax._src import backward_dtype
from grain_optax._src import grouping
from grain_optax._src import reductions
from grain_optax._src import row_lookups
from grain_optax._src import validation


def nnx_group_value_and_grad(
    loss_fn: Callable[..., Any],
    num_groups: int,
    *,
    wrt: Any = None,
    has_aux: bool = False,
    example_mask: Optional[Callable[[Any], Any]] = None,
    grad_dtype: str = 'backward',
    split_sums: Union[bool, str] = 'auto',
    row_sparse: bool = False,
) -> Callable[..., Any]:
  r"""Per-group losses and gradients of a Flax NNX module, for :func:`grain`.

  The NNX counterpart of :func:`group_value_and_grad`: splits ``batch`` along
  axis 0 of every leaf into ``num_groups`` equal contiguous groups and maps
  ``nnx.value_and_grad(loss_fn)`` over them with ``nnx.vmap``, the module
  shared. Group :math:`i` gets :math:`L_i` and
  :math:`g_i = \nabla_\theta L_i` for the variables selected by ``wrt``. The
  gradients have the structure ``nnx.Optimizer.update`` expects, with a
  leading group axis on every leaf, so one line trains with GRAIN::

    tx = optax.chain(grain_optax.grain(), optax.adamw(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grad_fn = grain_optax.nnx_group_value_and_grad(loss_fn, 4)
    losses, grads = grad_fn(model, batch)
    optimizer.update(model, grads)

  RNG streams (``nnx.Rngs``, e.g. for ``nnx.Dropout``) are split so that every
  group draws its own random numbers, and they advance as in an ordinary step.
  Other non-differentiated state is shared read-only by the groups: a loss
  that updates it (``nnx.BatchNorm`` in training mode) raises a ``ValueError``
  (use ``model.eval()`` or ``use_running_average=True`` for the groups, or a
  per-example normalisation such as ``nnx.LayerNorm``). To run the groups in
  sequence and save activation memory, apply :func:`group_value_and_grad`
  with ``chunk_size`` to a pure function of ``nnx.split`` state instead.

  Args:
    loss_fn: ``loss_fn(model, batch, *args) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``); the loss must be a scalar, typically the mean
      over the examples of ``batch``.
    num_groups: the number of groups ``m >= 1``; must divide the batch size.
    wrt: an ``nnx`` filter of the variables to differentiate; default
      ``nnx.Param``. Use the same filter as the ``nnx.Optimizer``.
    has_aux: as in ``nnx.value_and_grad``.
    example_mask: for padded batches, a function of ``batch`` returning its
      ``[B]`` per-example validity mask; the function made then also returns
      the ``[m]`` bool ``group_mask`` to pass on as
      ``optimizer.update(model, grads, group_mask=group_mask)`` (see
      :func:`group_value_and_grad`).
    grad_dtype: ``'backward'`` (default): a float32 variable that the model
      uses only through one cast to a narrower float (layers built with
      ``dtype=jnp.bfloat16, param_dtype=jnp.float32``) gets its per-group
      gradients in that dtype, which loses nothing (see
      :func:`group_value_and_grad`); ``'params'``: every gradient in its
      variable's dtype.
    split_sums: with ``num_groups > 1``, large per-group sums over the
      leading axes (bias and LayerNorm gradients) run as float32 partial
      sums and their sum, which XLA runs faster on a GPU. ``'auto'``
      (default): on where the step is traced for a GPU, off elsewhere; True
      or False force it (see :func:`group_value_and_grad`).
    row_sparse: give each variable that the loss reads only by row lookups
      (``nnx.Embed``, ``jnp.take(table, ids, axis=0)``, looked through casts
      and ``jax.jit`` calls) its per-group gradient as a
      :class:`RowSparse`, the looked-up rows' gradients and their ids,
      instead of ``m`` dense tables. :func:`grain` takes it (on one device)
      and returns a dense update; the Gram and the update are the same
      sums in another order. A word embedding is most of a small text
      model's parameters but a group touches few of its rows: on MiniLM
      (16 x 128 tokens, float32, m = 8) the dense per-group tables are
      375 MB that the step writes and reads twice. Default False.
      Variables with any other use (a tied output projection) stay dense.

  Returns:
    A function ``(model, batch, *args) -> (losses, grads)`` or
    ``((losses, aux), grads)``: ``losses`` is ``[m]``; ``aux`` and every leaf
    of the ``nnx.State`` ``grads`` have a leading group axis ``m``. Extra
    positional ``args`` are shared by all groups. With ``example_mask``, a
    third element ``group_mask``.

  Raises:
    ImportError: if Flax is not installed (``pip install grain_optax[flax]``).
    ValueError: if ``num_groups < 1``; when called, if a batch leaf's size is
      not divisible by ``num_groups`` (naming the leaf) or ``loss_fn`` updates
      shared module state.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import grain_optax
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> def loss_fn(model, batch):
    ...   return jnp.mean((model(batch['x'])[:, 0] - batch['y']) ** 2)
    >>> batch = {'x': jnp.ones((8, 3)), 'y': jnp.arange(8.)}
    >>> losses, grads = grain_optax.nnx_group_value_and_grad(loss_fn, 4)(
    ...     model, batch)
    >>> losses.shape, grads['kernel'].shape
    ((4,), (4, 3, 1))
    >>> tx = optax.chain(grain_optax.grain(num_groups=4), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> _ = optimizer.update(model, grads)
    >>> int(optimizer.step[...])
    1
  """
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'grain_optax.nnx_group_value_and_grad needs Flax: '
        'pip install grain_optax[flax]  (or: pip install flax).') from e

  num_groups = validation.check_num_groups(num_groups)
  backward_dtype.check_grad_dtype(grad_dtype,
                                  'grain_optax.nnx_group_value_and_grad')
  if wrt is None:
    wrt = nnx.Param
  grad_fn = nnx.value_and_grad(
      loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
  # RNG streams get one key per group; everything else is broadcast.
  module_axes = nnx.StateAxes({nnx.RngState: 0, ...: None})

  def narrowed(model, groups, args):
    """A copy of ``model`` with each losslessly narrowable variable cast.

    Returns ``(copy, dtypes)``, ``dtypes`` the differentiated variables'
    own dtypes, or None when no variable narrows.
    """
    graphdef, diff, rest = nnx.split(model, wrt, ...)
    leaves, treedef = jax.tree_util.tree_flatten(diff)

    def loss_of(new_leaves):
      def one(group):
        # Fresh variables made inside the map: NNX state must not cross
        # trace levels (a dropout layer advances its RNG count here).
        copy = nnx.merge(graphdef,
                         jax.tree_util.tree_unflatten(treedef, new_leaves),
                         jax.tree_util.tree_map(lambda x: x, rest))
        # The whole output, aux too (a variable returned in aux keeps its
        # dtype and value).
        return loss_fn(copy, group, *args)
      return jax.vmap(one)(groups)

    narrow = backward_dtype.narrowed(loss_of, leaves)
    if narrow is None:
      return None
    copy = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, narrow),
                     rest)
    return copy, [jnp.result_type(x) for x in leaves]

  def on_wide(dtypes):
    """``loss_fn`` run on the narrow variables cast back to ``dtypes``.

    The loss then computes exactly what it computes on the model's own
    variables (see ``backward_dtype``); only the variables of
    differentiation are the narrow copies. State the loss changes (RNG
    counts) is written back to the module it was given.
    """
    def loss_wide(model, group, *args):
      graphdef, diff, rest = nnx.split(model, wrt, ...)
      leaves, treedef = jax.tree_util.tree_flatten(diff)
      wide = jax.tree_util.tree_unflatten(
          treedef, backward_dtype.widened(leaves, dtypes))
      inner = nnx.merge(graphdef, wide, rest)
      out = loss_fn(inner, group, *args)
      nnx.update(model, nnx.state(inner, nnx.Not(wrt)))
      return out
    return loss_wide

  def by_rows(loss, dense_grad_fn):
    """``dense_grad_fn`` with the tables read only by row lookups
    differentiated as rows (``RowSparse``; see ``row_lookups``)."""
    def grad_fn(model, group, *args):
      graphdef, diff, rest = nnx.split(model, wrt, ...)
      leaves, treedef = jax.tree_util.tree_flatten(diff)

      def pure(leaves, rest, group, *args):
        inner = nnx.merge(graphdef, jax.tree_util.tree_unflatten(
            treedef, leaves), rest)
        out = loss(inner, group, *args)
        value, aux = out if has_aux else (out, None)
        return value, (aux, nnx.state(inner, nnx.Not(wrt)))

      found = row_lookups.value_and_grad(pure, leaves, rest, group, *args)
      if found is None:
        return dense_grad_fn(model, group, *args)
      (value, (aux, new_rest)), grads = found
      nnx.update(model, new_rest)
      grads = jax.tree_util.tree_unflatten(treedef, grads)
      return ((value, aux) if has_aux else value), grads
    return grad_fn

  def wrapped(model, batch, *args):
    groups = grouping.split_into_groups(batch, num_groups)
    narrow = (narrowed(model, groups, args) if grad_dtype == 'backward'
              else None)
    copy, this_grad_fn = None, grad_fn
    if narrow is not None:
      copy, dtypes = narrow
      this_loss = on_wide(dtypes)
      this_grad_fn = nnx.value_and_grad(
          this_loss, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
    if row_sparse:
      this_grad_fn = by_rows(loss_fn if narrow is None else this_loss,
                             this_grad_fn)

    @nnx.split_rngs(splits=num_groups)
    @nnx.vmap(in_axes=(module_axes, 0) + (None,) * len(args), out_axes=0)
    def per_group(model, group, *args):
      if not (reductions.use_split_sums(split_sums) and num_groups > 1):
        return this_grad_fn(model, group, *args)
      graphdef, state = nnx.split(model)

      def pure(state, group, *args):
        inner = nnx.merge(graphdef, state)
        return this_grad_fn(inner, group, *args), nnx.state(inner)

      out, new_state = reductions.split_leading_sums(pure)(state, group, *args)
      nnx.update(model, new_state)
      return out

    try:
      out = per_group(model if copy is None else copy, groups, *args)
      if copy is not None:
        # The groups advanced the copy's RNG streams: carry them over.
        nnx.update(model, nnx.state(copy, nnx.RngState))
    except ValueError as e:
      if 'out_axes' not in str(e):
        raise
      raise ValueError(
          'grain_optax.nnx_group_value_and_grad: loss_fn changed module state '
          'that the groups share (other than RNG streams), e.g. nnx.BatchNorm '
          'statistics in training mode; the groups cannot each update one '
          'shared copy. Call model.eval() (or set use_running_average=True), '
          f'or use a per-example normalisation. Flax said: {e}') from e
    if example_mask is None:
      return out
    mask = grouping.group_mask_of(example_mask, [batch], num_groups,
                                  'grain_optax.nnx_group_value_and_grad')
    return out + (mask,)

  return wrapped
