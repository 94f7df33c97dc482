"""The states of :func:`grain` and :func:`accumulate`, and their statistics.

:class:`GrainState` describes one solve (the weights, the KKT residual, how
much the groups conflict). :func:`min_norm_point.run` computes the
:class:`Statistics` of a step with :func:`solve_statistics`, on the Gram it
normalised for the solve; both transformations then build the state with
:func:`solution_state`. :func:`grain_statistics` finds every one in an
optimizer state, for logging.
"""

from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from grain_optax._src import solvers
from grain_optax._src import variants


class GrainState(NamedTuple):
  """State of :func:`grain`: what the last update did, for logging.

  Every field describes the most recent call of ``update`` (zeros and uniform
  weights before the first one).

  Attributes:
    count: ``[]`` int32, number of updates so far.
    weights: ``[num_groups]`` float32 convex weights of the last update (zero
      for excluded groups), or ``None`` when ``num_groups`` was not given to
      :func:`grain`: the group count is then known only inside ``update``,
      and a state's shapes are fixed by ``init``, so the weights are not
      recorded (give ``num_groups`` to log them). ``None`` is an empty
      subtree: the state still saves and restores with orbax, passes through
      ``jax.lax.cond`` and ``jit``, and every other field is recorded.
    kkt_residual: ``[]`` float32 relative KKT residual of the weights (see
      :func:`kkt_residual`); near 1e-7 or below for the exact solver.
    norm_ratio: ``[]`` float32 :math:`\\|d\\| / \\|\\bar g\\|`, the norm of the
      min-norm point over the norm of the plain mean of the (finite) groups
      (whatever ``apply`` is); at most 1; 0 when the mean is zero.
    min_cosine: ``[]`` float32 smallest cosine between the min-norm point
      :math:`d` and a group gradient (whatever ``apply`` is); never
      negative (GRAIN's guarantee): 0 when :math:`d` is zero to the
      solver's precision, i.e. when
      :math:`\\|d\\|^2` is within 4 times the weights' KKT shortfall
      :math:`\\max_i (\\|d\\|^2 - \\langle d, g_i \\rangle)` of 0 (0 then
      lies in the hull of the groups, up to rounding). Compare with the
      same statistic for the mean to see how much conflict there was.
    mean_min_cosine: ``[]`` float32 smallest cosine between the plain mean and
      a group gradient; negative when the mean would have raised some group's
      loss to first order.
    num_nonfinite: ``[]`` int32, groups excluded from the last update because
      their gradient held NaN or infinity (or overflowed float32 in the Gram).
    num_iterations: ``[]`` int32 iterations of the QP solver (as in
      :class:`MinNormSolution`).
    update_min_cosine: ``[]`` float32 smallest cosine between the update
      that was applied and a group gradient: ``min_cosine`` for
      ``apply='grain'`` and ``'grain_at_mean_length'``, ``mean_min_cosine``
      for ``'mean'`` and ``'mean_at_grain_length'``.
    effective_groups: ``[]`` float32 :math:`\\exp(-\\sum_i w_i \\log w_i)` of
      the min-norm weights: ``n`` when they are uniform over ``n`` groups
      (GRAIN then applies the mean), 1 when one group takes all the weight.
    num_excluded: ``[]`` int32 groups left out of the last update by
      ``group_mask`` (or ``microbatch_mask``), not counting non-finite ones.
  """
  count: jax.Array
  weights: Optional[jax.Array]
  kkt_residual: jax.Array
  norm_ratio: jax.Array
  min_cosine: jax.Array
  mean_min_cosine: jax.Array
  num_nonfinite: jax.Array
  num_iterations: jax.Array
  update_min_cosine: jax.Array
  effective_groups: jax.Array
  num_excluded: jax.Array


def statistics(k: jax.Array, weights: jax.Array, valid: jax.Array
               ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Norm ratio and worst cosines from the normalised Gram, O(m^2)."""
  mean_w = variants.mean_weights(valid)
  diag = jnp.diagonal(k)
  norms = jnp.sqrt(jnp.maximum(diag, 0.0))

  def worst_cosine(w, tied):
    kw = jnp.dot(k, w, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.maximum(jnp.dot(w, kw, precision=jax.lax.Precision.HIGHEST), 0.0)
    # k has unit largest diagonal: below ||d|| = 1e-6 max_i ||g_i|| (the
    # solver's float32 floor), d is 0 and its direction is rounding noise.
    sq = jnp.where(sq > 1e-12, sq, 0.0)
    cut = sq
    if tied:
      # The min-norm point: <d, g_i> = (Kw)_i >= ||d||^2 - deficit, with
      # deficit the weights' KKT shortfall (rounding and the solver's
      # tolerance). Where ||d||^2 > 4 * deficit every (Kw)_i > 0.75 ||d||^2
      # and the cosines are positive; below, d is zero to the solver's
      # precision and its direction is noise: reported as 0.
      valid_kw = jnp.where(valid, kw, jnp.inf)
      deficit = jnp.maximum(sq - jnp.min(valid_kw), 0.0)
      cut = jnp.where(sq > 4.0 * deficit, sq, 0.0)
    denom = jnp.sqrt(cut) * norms
    cos = jnp.where(valid & (denom > 0), kw / jnp.where(denom > 0, denom, 1.0),
                    jnp.inf)
    worst = jnp.min(cos)
    return jnp.where(jnp.isfinite(worst), jnp.clip(worst, -1.0, 1.0), 0.0), sq

  min_cos, d_sq = worst_cosine(weights, True)
  mean_min_cos, mean_sq = worst_cosine(mean_w, False)
  ratio = jnp.where(
      mean_sq > 0,
      jnp.sqrt(d_sq / jnp.where(mean_sq > 0, mean_sq, 1.0)), 0.0)
  return ratio, min_cos, mean_min_cos


def initial_state(num_weights: Optional[int]) -> GrainState:
  """The :class:`GrainState` before any update: uniform weights, zeros.

  Args:
    num_weights: the length of ``weights``; 0 or None records no weights
      (``weights`` is None; a zero-size array would not save with orbax).
  """
  return GrainState(
      count=jnp.zeros([], jnp.int32),
      weights=(jnp.full([num_weights], 1.0 / num_weights, jnp.float32)
               if num_weights else None),
      kkt_residual=jnp.zeros([], jnp.float32),
      norm_ratio=jnp.zeros([], jnp.float32),
      min_cosine=jnp.zeros([], jnp.float32),
      mean_min_cosine=jnp.zeros([], jnp.float32),
      num_nonfinite=jnp.zeros([], jnp.int32),
      num_iterations=jnp.zeros([], jnp.int32),
      update_min_cosine=jnp.zeros([], jnp.float32),
      effective_groups=jnp.zeros([], jnp.float32),
      num_excluded=jnp.zeros([], jnp.int32),
  )


class Statistics(NamedTuple):
  """What one solve did: the statistics :class:`GrainState` records."""
  norm_ratio: jax.Array
  min_cosine: jax.Array
  mean_min_cosine: jax.Array
  update_min_cosine: jax.Array
  effective_groups: jax.Array
  num_nonfinite: jax.Array
  num_excluded: jax.Array


def solve_statistics(k: jax.Array, valid: jax.Array, weights: jax.Array,
                     mask: Optional[jax.Array] = None,
                     apply: str = 'grain') -> Statistics:
  """The :class:`Statistics` of min-norm ``weights``, O(m^2).

  Args:
    k: the ``[m, m]`` normalised Gram matrix that was solved, and
    valid: its ``[m]`` included groups, both from
      :func:`solvers.normalize_gram`.
    weights: the ``[m]`` min-norm weights.
    mask: the ``[m]`` groups that took part (None: all).
    apply: what was applied (see :mod:`variants`), for
      ``update_min_cosine``.
  """
  weights = jnp.asarray(weights, jnp.float32)
  ratio, min_cos, mean_min_cos = statistics(k, weights, valid)
  update_cos = (min_cos if apply in ('grain', 'grain_at_mean_length')
                else mean_min_cos)
  entropy = -jnp.sum(jnp.where(weights > 0,
                               weights * jnp.log(jnp.where(weights > 0,
                                                           weights, 1.0)),
                               0.0))
  effective = jnp.where(jnp.any(weights > 0), jnp.exp(entropy), 0.0)
  m = k.shape[0]
  considered = m if mask is None else jnp.sum(jnp.asarray(mask, bool))
  return Statistics(
      norm_ratio=ratio.astype(jnp.float32),
      min_cosine=min_cos.astype(jnp.float32),
      mean_min_cosine=mean_min_cos.astype(jnp.float32),
      update_min_cosine=update_cos.astype(jnp.float32),
      effective_groups=effective.astype(jnp.float32),
      num_nonfinite=(considered - jnp.sum(valid)).astype(jnp.int32),
      num_excluded=jnp.asarray(m - considered, jnp.int32),
  )


def solution_state(previous: GrainState, solution: solvers.MinNormSolution,
                   stats: Statistics, *,
                   record_weights: bool = True) -> GrainState:
  """The :class:`GrainState` describing one solve.

  Args:
    previous: the state before this update (its count is incremented; its
      weights are kept when ``record_weights`` is False).
    solution: the :class:`MinNormSolution` of the solve.
    stats: its :class:`Statistics` (from :func:`solve_statistics`).
    record_weights: store ``solution.weights`` in the state.
  """
  new = GrainState(
      count=optax.safe_increment(previous.count),
      weights=solution.weights if record_weights else previous.weights,
      kkt_residual=jnp.asarray(solution.kkt_residual, jnp.float32),
      num_iterations=jnp.asarray(solution.num_iterations, jnp.int32),
      **stats._asdict(),
  )
  # Every field reads its previous value (a select that never picks it:
  # ``count`` never falls below 0). A field that the update only writes
  # would be an unused input of a jitted step, which ``jax.jit`` prunes
  # (``keep_unused=False``): it is then neither donated nor aliased to its
  # output, lands in a fresh buffer on every call, and on a GPU XLA
  # re-records the step's CUDA graph for the moved buffer each time
  # (``benchmarks/command_buffers.py``; RESULTS.md, "Short steps").
  never = previous.count < 0
  return jax.tree_util.tree_map(
      lambda fresh, old: jnp.where(never, old, fresh), new, previous)


class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    mini_step: ``[]`` int32, the number of gradients stored in the current
      window, ``0 <= mini_step < every_k``; 0 again right after the window
      closed and the inner transformation stepped.
    buffer: a pytree shaped like the params whose every leaf is
      ``[max_every_k, *param_shape]`` in the buffer dtype. Slots
      ``0 .. mini_step - 1`` hold the current window's gradients; later slots
      hold stale values from an earlier window, which the solver never uses.
    inner_state: the inner transformation's state; it moves only when a
      window closes.
    in_use: ``[max_every_k]`` bool, True for the slots of the current window
      whose gradient takes part in its min-norm point (False for a call made
      with ``microbatch_mask=False``, e.g. an all-padding micro-batch).
    stats: a :class:`GrainState` describing the last closed window (uniform
      weights and zeros before the first): ``count`` is the number of windows
      closed so far, i.e. the number of inner steps; ``weights`` is
      ``[max_every_k]`` float32, the convex weights of the window's gradients
      (zero for slots outside the window and for non-finite gradients);
      ``num_nonfinite`` counts the window's gradients excluded for NaN or
      infinity; the other fields are as in :func:`grain`.
  """
  mini_step: jax.Array
  buffer: Any
  inner_state: Any
  in_use: jax.Array
  stats: GrainState


def grain_statistics(opt_state: Any) -> Dict[str, GrainState]:
  """The GRAIN statistics held anywhere in an optimizer state, for logging.

  Finds every :class:`GrainState` in ``opt_state`` (from :func:`grain`, and
  the ``stats`` of :func:`accumulate`), whether it comes from ``optax``
  directly, a Linen ``TrainState.opt_state`` or an ``nnx.Optimizer``'s
  ``opt_state`` (whose ``nnx`` variables are unwrapped to arrays).

  Args:
    opt_state: an optimizer state, e.g. of
      ``optax.chain(grain(), accumulate(adamw(...), every_k=4))``.

  Returns:
    A dict from name to :class:`GrainState` of arrays, in the order found:
    ``'grain'`` for the within-batch statistics, ``'accumulate'`` for the
    across-batch ones (``'grain_1'``, ... if there are several).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import grain_optax
    >>> tx = optax.chain(grain_optax.grain(),
    ...                  grain_optax.accumulate(optax.sgd(0.1), every_k=2))
    >>> stats = grain_optax.grain_statistics(tx.init({'w': jnp.zeros(3)}))
    >>> list(stats), int(stats['accumulate'].count)
    (['grain', 'accumulate'], 0)
  """
  def is_node(x):
    return isinstance(x, (GrainState, AccumulateState))

  def unwrap(x):
    if hasattr(x, 'get_value'):  # an nnx.Variable
      return x.get_value()
    return getattr(x, 'value', x)

  found = {}

  def visit(tree):
    for node in jax.tree_util.tree_leaves(tree, is_leaf=is_node):
      if isinstance(node, AccumulateState):
        visit(node.inner_state)
        add('accumulate', node.stats)
      elif isinstance(node, GrainState):
        add('grain', node)

  def add(base, stats):
    name, i = base, 0
    while name in found:
      i += 1
      name = f'{base}_{i}'
    found[name] = GrainState(*(unwrap(x) for x in stats))

  visit(opt_state)
  return found
