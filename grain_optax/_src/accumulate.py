r"""``accumulate()``: GRAIN across mini-batches (gradient accumulation).

Gradient accumulation (e.g. ``optax.MultiSteps``) averages the gradients of
:math:`k` micro-batches before one optimizer step. :func:`accumulate` replaces
that mean with the minimum-norm point of the :math:`k` stored gradients,

.. math::
  d = \sum_{j=1}^k w_j\, g_j, \qquad
  w = \operatorname*{argmin}_{w \in \Delta_k} \Big\|\sum_j w_j g_j\Big\|^2,

and hands :math:`d` to an inner transformation once per window.
"""

from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grain_optax._src import min_norm_point as mnp_lib
from grain_optax._src import solvers
from grain_optax._src import state as state_lib
from grain_optax._src import validation
from grain_optax._src import variants

EveryK = Union[int, jax.Array, Callable[[jax.Array], Any]]


def _window_size(every_k: EveryK, max_every_k: int,
                 step: jax.Array) -> Union[int, jax.Array]:
  """The current window size: a Python int, or an int32 array in [1, max]."""
  if isinstance(every_k, int):
    return every_k
  k = every_k(step) if callable(every_k) else every_k
  k = jnp.asarray(k)
  if k.shape != ():
    raise ValueError(
        f'grain_optax.accumulate: every_k must give a scalar window size; got '
        f'shape {k.shape}.')
  return jnp.clip(k.astype(jnp.int32), 1, max_every_k)


def _check_window(every_k: Any, max_every_k: Any,
                  caller: str) -> Tuple[Any, int]:
  """:func:`accumulate`'s ``(every_k, max_every_k)``, checked.

  Returns ``every_k`` as a Python int when it is integer-like (else as
  given: a schedule or an array) and ``max_every_k`` as a Python int.
  """
  if isinstance(every_k, (bool, np.bool_)):
    raise ValueError(f'{caller}: every_k must be an int >= 1, got '
                     f'{every_k!r}.')
  if validation.is_int_like(every_k):  # Python or NumPy integer.
    every_k = int(every_k)
    if every_k < 1:
      raise ValueError(f'{caller}: every_k must be >= 1, got {every_k}.')
    if max_every_k is None:
      max_every_k = every_k
    if max_every_k != every_k:
      raise ValueError(
          f'{caller}: with an int every_k={every_k}, '
          f'max_every_k must be None or equal to it, got {max_every_k}.')
  elif max_every_k is None:
    raise ValueError(
        f'{caller}: every_k is a schedule or an array '
        f'({type(every_k).__name__}), so the buffer size cannot be read from '
        'it; give max_every_k (a Python int >= 1) to keep shapes static. With '
        "optax.inject_hyperparams, either pass static_args=('every_k',) or "
        'give max_every_k.')
  max_every_k = validation.positive_int(
      max_every_k, 'max_every_k', caller,
      hint=(" (with optax.inject_hyperparams, pass "
            "static_args=('max_every_k',))"))
  return every_k, max_every_k


def _check_like_buffer(updates: Any, buffer: Any, caller: str) -> None:
  """Checks that ``updates`` is :func:`accumulate`'s buffer without slots."""
  b_struct = jax.tree_util.tree_structure(buffer)
  u_struct = jax.tree_util.tree_structure(updates)
  if b_struct != u_struct:
    raise ValueError(
        f'{caller}: the updates and the params given to init '
        f'have different tree structures:\n  updates: {u_struct}\n'
        f'  params:  {b_struct}')
  u_leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, u), b in zip(u_leaves, jax.tree_util.tree_leaves(buffer)):
    shape = tuple(getattr(u, 'shape', ()))
    if shape != tuple(b.shape[1:]):
      hint = ''
      if len(shape) == b.ndim and shape[1:] == tuple(b.shape[1:]):
        hint = (' These look like per-group gradients (a leading group axis of '
                f'{shape[0]}): put grain_optax.grain() before accumulate in '
                'the chain to combine the groups first.')
      raise ValueError(
          f'{caller}: leaf {validation.leaf_name(path)} of the '
          f'updates has shape {shape}, but the matching param has shape '
          f'{tuple(b.shape[1:])}; accumulate takes one ordinary '
          f'(params-shaped) gradient per call.{hint}')


def _microbatch_mask(mask: Any, caller: str) -> jax.Array:
  """:func:`accumulate`'s ``microbatch_mask`` as a scalar bool array."""
  if mask is None:
    return jnp.ones([], bool)
  if np.shape(mask) != ():
    raise ValueError(
        f'{caller}: microbatch_mask must be a scalar bool '
        '(False: this call\'s gradient takes no part in the window), got '
        f'shape {np.shape(mask)}.')
  return jnp.asarray(mask).astype(bool)


def accumulate(
    inner: optax.GradientTransformation,
    *,
    every_k: EveryK,
    max_every_k: Optional[int] = None,
    buffer_dtype: Optional[Any] = None,
    solver: solvers.Solver = 'exact',
    tolerance: Optional[jax.typing.ArrayLike] = None,
    max_iterations: Optional[int] = None,
    regularization: jax.typing.ArrayLike = 1e-7,
    stepsize: jax.typing.ArrayLike = 0.0,
    apply: str = 'grain',
    solver_options: Optional[solvers.SolverOptions] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GRAIN across mini-batches: one inner step on the min-norm point of k.

  The drop-in replacement of ``optax.MultiSteps`` in which the mean of the
  :math:`k` micro-batch gradients :math:`g_1, \dots, g_k` of a window becomes

  .. math::
    d = \sum_{j=1}^k w_j\, g_j, \qquad
    w = \operatorname*{argmin}_{w \in \Delta_k} w^\top K w, \quad
    K_{ij} = \langle g_i, g_j \rangle,

  so that :math:`\langle d, g_j \rangle \ge \|d\|^2 \ge 0` for every
  micro-batch. On each of the first :math:`k - 1` calls of a window,
  ``update`` stores its (params-shaped) gradient and returns all-zero updates,
  leaving ``inner``'s state untouched; on the :math:`k`-th it solves the QP
  over the :math:`k` stored gradients (:func:`gram_matrix`,
  :func:`min_norm_weights`, :func:`combine`) and calls ``inner.update`` once on
  :math:`d`, passing on ``params`` and the extra arguments of that call. The
  result equals :func:`grain` applied to the :math:`k` gradients stacked on a
  group axis, followed by ``inner``.

  Each gradient may itself be a within-batch GRAIN result::

    optax.chain(grain_optax.grain(),
                grain_optax.accumulate(optax.adamw(1e-3), every_k=4))

  Memory: the buffer holds :math:`k` gradients, i.e. :math:`k` times the
  params in ``buffer_dtype`` (``max_every_k`` times with a schedule);
  ``buffer_dtype=jnp.bfloat16`` halves it for float32 params.
  ``optax.MultiSteps`` keeps one running sum instead (1 times the params): the
  min-norm point needs every gradient of the window, not just their sum.
  Gradients are rounded to ``buffer_dtype`` when stored; the Gram matrix and
  the combination accumulate in float32, and :math:`d` is returned in the
  dtype of the incoming updates.

  A micro-batch gradient holding NaN or infinity gets weight 0 (counted in
  ``state.stats.num_nonfinite``); if all of a window's gradients are
  non-finite, ``inner`` receives NaN (as with the plain mean), so that an
  inner ``optax.apply_if_finite`` skips that step.

  A micro-batch that must not count (all padding: its zero gradient would
  put 0 in the hull and make :math:`d = 0`) is passed with
  ``update(..., microbatch_mask=False)``: it fills its slot of the window but
  takes no part in the min-norm point (weight 0, not counted as non-finite).
  If no gradient of a window takes part, ``inner`` receives zeros.

  Args:
    inner: the transformation to step once per window (e.g.
      ``optax.adamw(1e-3)``); plain ``GradientTransformation`` or one taking
      extra arguments.
    every_k: the window size :math:`k`: an int ``>= 1`` (Python or NumPy),
      or, when ``max_every_k`` is given, a schedule ``step -> k`` evaluated at
      the number of inner steps taken so far (like ``MultiSteps``'
      ``every_k_schedule``) or a scalar int array (e.g. injected by
      ``optax.inject_hyperparams``). Values from a schedule or an array are
      clipped to ``[1, max_every_k]``.
    max_every_k: the buffer's number of slots, a Python int; required when
      ``every_k`` is not an int (shapes must be static, so the buffer is sized
      for the largest window), and defaults to ``every_k`` otherwise.
    buffer_dtype: dtype of the stored gradients, a floating dtype; ``None``
      (default) uses each param's own dtype. With
      ``optax.inject_hyperparams``, list it in ``static_args`` or give it as
      a string such as ``'bfloat16'``.
    solver: ``'exact'`` (default) or ``'projected_gradient'``; see
      :func:`min_norm_weights`.
    tolerance: solver tolerance (see :func:`min_norm_weights`); may be injected.
    max_iterations: solver iteration cap (see :func:`min_norm_weights`).
    regularization: ridge for the exact solver; may be injected.
    stepsize: fixed step for the projected-gradient solver, 0 for line search.
    apply: what the update is; the window's weights and statistics
      (``state.stats``) are those of the min-norm point whatever is
      applied; the values are those of :func:`grain`, over the window's
      gradients instead of a batch's groups.
      ``'grain'`` (default): the min-norm point :math:`d`.
      ``'mean'``: the plain mean of the window's gradients that take
      part and are finite (**monitor mode**: ordinary training, equal to
      ``optax.MultiSteps``'s mean up to float32 rounding, while the state
      logs what GRAIN would have done; read it with :func:`metrics`).
      ``'mean_at_grain_length'``: the mean's direction shortened to
      :math:`\|d\|`; ``'grain_at_mean_length'``: :math:`d`'s direction at
      the mean's length (zero when :math:`d = 0`). In this project's
      study (``benchmarks/STABILITY.md``), fine-tuning MiniLM with SGD +
      momentum and one example per group, ``'grain'`` kept training at
      learning rates where the mean diverged, ``'mean_at_grain_length'``
      did best of all (the gain is GRAIN's shorter step) and
      ``'grain_at_mean_length'`` diverged like the mean; at tuned AdamW
      learning rates ``'grain'`` did not beat the mean (MiniLM), nor did
      the two rescaled arms (small MLPs). See ``docs/when_grain_helps.md``
      and ``docs/guides/monitor.md``.
    solver_options: the solver options as one :class:`SolverOptions`, in
      place of ``solver`` ... ``stepsize`` (see :func:`grain`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`AccumulateState`; its ``update`` accepts extra keyword arguments
    and forwards them to ``inner`` on the calls that close a window.

  Raises:
    ValueError: for ``every_k < 1``, a non-int ``every_k`` without
      ``max_every_k``, an unknown solver, ``solver_options`` with a flat
      solver keyword that differs from its default, a ``buffer_dtype`` that
      is not a
      floating dtype, or (when tracing ``update``) updates that are not
      shaped like the params, naming the leaf and its shape.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import grain_optax
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = grain_optax.accumulate(optax.sgd(1.0), every_k=2)
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.array([1., 0.])}, state, params)
    >>> u['w'].tolist()  # first of two: stored, no step
    [0.0, 0.0]
    >>> u, state = tx.update({'w': jnp.array([0., 2.])}, state, params)
    >>> [round(x, 4) for x in u['w'].tolist()]  # -(0.8 g_1 + 0.2 g_2)
    [-0.8, -0.4]
    >>> [round(x, 4) for x in state.stats.weights.tolist()]
    [0.8, 0.2]
  """
  caller = 'grain_optax.accumulate'
  apply = variants.check_apply(apply, caller)
  every_k, max_every_k = _check_window(every_k, max_every_k, caller)
  # Numeric solver options may be arrays (optax.inject_hyperparams).
  options = solvers.check_options(solvers.merge_options(
      solver_options, caller=caller, solver=solver, tolerance=tolerance,
      max_iterations=max_iterations, regularization=regularization,
      stepsize=stepsize), caller=caller)
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        'grain_optax.accumulate: inner must be an optax '
        f'GradientTransformation, got {type(inner).__name__}.')
  inner = optax.with_extra_args_support(inner)
  num_slots = max_every_k
  buffer_dtype = validation.float_dtype(
      buffer_dtype, 'buffer_dtype', caller,
      hint=' (the gradients are stored in it: an integer buffer truncates '
      'them, to zero for most)')

  def init_fn(params):
    if params is None:
      raise ValueError(
          'grain_optax.accumulate: init needs the params, to size the buffer.')

    def slots(p):
      p = jnp.asarray(p)
      dtype = p.dtype if buffer_dtype is None else buffer_dtype
      return jnp.zeros((num_slots,) + p.shape, dtype)

    return state_lib.AccumulateState(
        mini_step=jnp.zeros([], jnp.int32),
        buffer=jax.tree_util.tree_map(slots, params),
        inner_state=inner.init(params),
        in_use=jnp.zeros([num_slots], bool),
        stats=state_lib.initial_state(num_slots),
    )

  def update_fn(updates, state, params=None, *, microbatch_mask=None,
                **extra_args):
    _check_like_buffer(updates, state.buffer, caller)
    k = _window_size(every_k, num_slots, state.stats.count)
    slot = state.mini_step
    take_part = _microbatch_mask(microbatch_mask, caller)
    in_use = jnp.where(slot == 0, jnp.zeros_like(state.in_use), state.in_use)
    in_use = jnp.where(jnp.arange(num_slots) == slot, take_part, in_use)
    buffer = jax.tree_util.tree_map(
        lambda b, u: jax.lax.dynamic_update_index_in_dim(
            b, jnp.asarray(u).astype(b.dtype), slot, 0),
        state.buffer, updates)
    filled = slot + 1
    close = filled >= k

    def step_inner(d, inner_state):
      return inner.update(d, inner_state, params, **extra_args)

    # Shapes and dtypes of what inner returns, for the zeros of a held call.
    out_struct = jax.eval_shape(step_inner, updates, state.inner_state)

    def close_window():
      in_window = (jnp.arange(num_slots) < filled) & in_use
      # If every gradient that takes part is non-finite, d is NaN (as in
      # grain()), so that an inner optax.apply_if_finite skips the step.
      step = mnp_lib.run(buffer, options, group_mask=in_window, apply=apply,
                         caller=caller)
      d = optax.tree.cast_like(step.update, updates)
      new_updates, new_inner = step_inner(d, state.inner_state)
      # Typed as before, Python scalars included (both branches of the cond
      # must agree, also under jax_enable_x64).
      new_inner = jax.tree_util.tree_map(
          lambda new, old: jnp.asarray(new).astype(jnp.asarray(old).dtype),
          new_inner, state.inner_state)
      stats = state_lib.solution_state(state.stats, step.solution,
                                       step.statistics)
      return new_updates, new_inner, stats

    def hold():
      zeros = optax.tree.zeros_like(out_struct[0])
      return zeros, state.inner_state, state.stats

    new_updates, inner_state, stats = jax.lax.cond(close, close_window, hold)
    new_state = state_lib.AccumulateState(
        mini_step=jnp.where(close, 0, filled).astype(jnp.int32),
        buffer=buffer,
        inner_state=inner_state,
        in_use=in_use,
        stats=stats,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
