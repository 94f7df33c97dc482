r"""Lean GRAIN: the combined gradient without holding m group gradients.

The default path (:func:`group_value_and_grad` then :func:`grain`) keeps all
:math:`m` group gradients in memory at once, :math:`m` times the memory of an
ordinary gradient. :func:`grain_value_and_grad` needs only the memory of an
ordinary training step (plus :math:`m` copies of the largest parameter leaf,
briefly), at the price of a second backward pass:

1. per-group gradients by ``vmap``, each leaf reduced into its
   :math:`m \times m` contribution to the Gram matrix :math:`K` as soon as it
   is produced, so the compiler can free it;
2. the min-norm weights :math:`w` from :math:`K` (:func:`min_norm_weights`);
3. one ordinary backward pass of the weighted loss
   :math:`\sum_i w_i L_i` (weights held constant), whose gradient is exactly
   :math:`\sum_i w_i \nabla L_i = \sum_i w_i g_i`.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from grain_optax._src import gram as gram_lib
from grain_optax._src import grouping
from grain_optax._src import min_norm_point as mnp_lib
from grain_optax._src import solvers
from grain_optax._src import validation
from grain_optax._src import variants


class GrainGrad(NamedTuple):
  """Result of the function made by :func:`grain_value_and_grad`.

  Attributes:
    losses: ``[m]`` the per-group losses :math:`L_i` (dtype of the loss).
    grads: the combined gradient :math:`d = \\sum_i w_i g_i`, shaped like the
      differentiated argument(s) (a tuple of trees if ``argnums`` is a
      tuple), in their dtypes; all NaN if every group that takes part is
      non-finite (as :func:`grain` returns, for ``optax.apply_if_finite``),
      all zeros if ``example_mask`` leaves no group.
    weights: ``[m]`` float32 min-norm convex weights (zero for excluded
      groups).
    gram: ``[m, m]`` float32 Gram matrix :math:`K_{ij} = \\langle g_i, g_j
      \\rangle` of the group gradients.
    kkt_residual: ``[]`` float32 relative KKT residual of the weights (see
      :func:`kkt_residual`).
    num_iterations: ``[]`` int32 iterations of the QP solver.
    num_nonfinite: ``[]`` int32 groups excluded because their gradient held
      NaN or infinity (groups left out by ``example_mask`` are not counted).
    aux: the auxiliary output of ``loss_fn`` with a leading group axis when
      ``has_aux=True`` (from the first pass), else None.
    norm_ratio, min_cosine, mean_min_cosine, update_min_cosine,
    effective_groups, num_excluded: ``[]`` statistics of the solve, as in
      :class:`GrainState` (read them with :func:`metrics`).
  """
  losses: jax.Array
  grads: Any
  weights: jax.Array
  gram: jax.Array
  kkt_residual: jax.Array
  num_iterations: jax.Array
  num_nonfinite: jax.Array
  aux: Any
  norm_ratio: jax.Array
  min_cosine: jax.Array
  mean_min_cosine: jax.Array
  update_min_cosine: jax.Array
  effective_groups: jax.Array
  num_excluded: jax.Array


def _first_pass_gram(per_group: Any, backend: Optional[str]) -> jax.Array:
  """The Gram of the first pass's group gradients, one buffer per leaf.

  XLA rewrites a dot that contracts several axes of ``[m, *param_shape]``
  into an ``[m, P] x [P, m]`` product, and XLA:CPU then writes the leaf out
  twice, once in each layout; from jaxlib 0.11 its scheduler also lets two
  leaves' pairs overlap (four buffers of ``m`` gradients of a leaf live at
  once). Contracting an ``[m, P]`` view instead gives the dot one operand
  that it reads twice: one buffer per leaf. Only on the CPU, and only for
  leaves whose type names no mesh; elsewhere the axes are contracted in
  place, as :func:`gram_matrix` does (the reshape would make the partitioner
  gather a leaf sharded along a minor axis). ``backend`` is
  ``SolverOptions.gram_backend``.
  """
  leaves = jax.tree_util.tree_leaves(per_group)

  def as_matrix(x):
    if x.ndim <= 2 or not jax.typeof(x).sharding.mesh.empty:
      return x
    return x.reshape(x.shape[0], -1)

  def on_cpu(*xs):
    return gram_lib.gram_of_leaves([as_matrix(x) for x in xs],
                                   backend=backend)

  def elsewhere(*xs):
    return gram_lib.gram_of_leaves(xs, backend=backend)

  return jax.lax.platform_dependent(*leaves, cpu=on_cpu, default=elsewhere)


def grain_value_and_grad(
    loss_fn: Callable[..., Any],
    num_groups: int,
    *,
    has_aux: bool = False,
    argnums: Union[int, Sequence[int]] = 0,
    batch_argnums: Union[int, Sequence[int]] = 1,
    chunk_size: Optional[int] = None,
    example_mask: Optional[Callable[..., Any]] = None,
    solver: solvers.Solver = 'exact',
    tolerance: Optional[jax.typing.ArrayLike] = None,
    max_iterations: Optional[int] = None,
    regularization: jax.typing.ArrayLike = 1e-7,
    stepsize: jax.typing.ArrayLike = 0.0,
    grad_dtype: str = 'backward',
    split_sums: Union[bool, str] = 'auto',
    apply: str = 'grain',
    solver_options: Optional[solvers.SolverOptions] = None,
) -> Callable[..., GrainGrad]:
  r"""The GRAIN gradient of a loss in the memory of an ordinary step.

  Splits the batch argument into ``num_groups`` groups as
  :func:`group_value_and_grad` does and returns

  .. math::
    d = \sum_{i=1}^m w_i\, \nabla L_i, \qquad
    w = \operatorname*{argmin}_{w \in \Delta_m} w^\top K w, \quad
    K_{ij} = \langle \nabla L_i, \nabla L_j \rangle,

  the same update as ``grain()`` applied to the per-group gradients, without
  ever holding all :math:`m` of them. A first pass computes the group
  gradients by ``vmap`` and reduces each parameter leaf into the Gram matrix
  (:func:`gram_matrix`); a second pass is one ordinary backward pass of
  :math:`\sum_i w_i L_i` with :math:`w` held constant, which equals
  :math:`\sum_i w_i \nabla L_i`. Peak memory stays near that of an ordinary
  training step, and the step costs one more forward and backward pass.

  Use it in place of ``jax.value_and_grad`` and give ``grads`` to any optax
  optimizer (no :func:`grain` in the chain). ``loss_fn`` must be a pure
  function of its arguments (both passes must see the same losses); for
  randomness, pass the key as an argument.

  Non-finite groups: a group whose gradient holds NaN or infinity is excluded
  (weight 0); in the second pass its examples are replaced by those of the
  group of largest weight (still with weight 0), so that no NaN reaches
  ``grads`` and no branch is needed. If every group is non-finite ``grads``
  is all NaN, as the plain mean's would be and as :func:`grain` returns, so
  that ``optax.apply_if_finite`` skips the step.

  Padded batches: a group made only of padding has a zero gradient, which puts
  0 in the convex hull and makes ``grads`` zero. Give ``example_mask`` (a
  function of the batch returning the ``[B]`` per-example validity mask):
  groups without a valid example are then excluded (weight 0, not counted in
  ``num_nonfinite``); if no group has one, ``grads`` is zero.

  Args:
    loss_fn: ``loss_fn(params, batch, *rest) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``); a scalar loss, typically the mean over the
      examples of ``batch``.
    num_groups: the number of groups ``m >= 1``; must divide the batch size.
    has_aux: as in ``jax.value_and_grad``.
    argnums: the argument(s) to differentiate.
    batch_argnums: the index of the argument to split into groups, or a
      tuple of indices, each split the same way.
    chunk_size: if given, the first pass runs ``chunk_size`` groups at a time
      (``jax.lax.map``), lowering its activation memory.
    example_mask: optional function of the batch argument(s) returning a
      ``[B]`` per-example validity mask; groups with no valid example are
      excluded (see above).
    solver: QP solver, see :func:`min_norm_weights`.
    tolerance: solver tolerance, see :func:`min_norm_weights`.
    max_iterations: solver iteration cap, see :func:`min_norm_weights`.
    regularization: ridge of the exact solvers, see :func:`min_norm_weights`.
    stepsize: fixed step of the projected-gradient solver, 0 for line
      search, see :func:`min_norm_weights`.
    grad_dtype: the dtype of the first pass's group gradients, see
      :func:`group_value_and_grad` (``grads`` is always in the dtypes of the
      differentiated arguments).
    split_sums: per-group sums of the first pass in two float32 stages, see
      :func:`group_value_and_grad`. ``'auto'`` (default): on where the step
      is traced for a GPU, off on CPUs and TPUs; True or False force it on or
      off. The second pass is an ordinary backward pass and is never
      rewritten.
    apply: what the update is; ``weights`` and every statistic in the result are
      those of the min-norm point whatever is applied; ``grads`` is the
      applied update, from the second pass with these coefficients.
      ``'grain'`` (default): the min-norm point :math:`d`.
      ``'mean'``: the plain mean of the groups that take part and are
      finite (**monitor mode**: the ordinary gradient, equal to
      ``jax.grad`` of the mean loss up to float32 rounding, with what GRAIN
      would have done in the other fields; read them with :func:`metrics`).
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
    A function with the signature of ``loss_fn`` returning a
    :class:`GrainGrad` (``losses``, ``grads``, ``weights``, ``gram``, the
    solver's figures, ``aux`` and the statistics of :class:`GrainState`).

  Raises:
    ValueError: for ``num_groups < 1``, an unknown solver,
      ``solver_options`` with a flat solver keyword that differs from its
      default, a batch argument that is also differentiated, or (when
      called) a batch size that ``num_groups`` does not divide or a
      ``split_sums`` other than ``'auto'``, True or False.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import grain_optax
    >>> def loss_fn(w, batch):
    ...   return jnp.mean((batch['x'] @ w - batch['y']) ** 2)
    >>> batch = {'x': jnp.eye(4), 'y': jnp.array([1., 1., 2., 2.])}
    >>> out = jax.jit(grain_optax.grain_value_and_grad(loss_fn, 2))(
    ...     jnp.zeros(4), batch)
    >>> [round(float(w), 3) for w in out.weights]
    [0.8, 0.2]
    >>> [round(float(g), 3) for g in out.grads]
    [-0.8, -0.8, -0.4, -0.4]
    >>> tx = optax.sgd(0.1)
    >>> updates, _ = tx.update(out.grads, tx.init(jnp.zeros(4)))
  """
  caller = 'grain_optax.grain_value_and_grad'
  num_groups = validation.check_num_groups(num_groups)
  apply = variants.check_apply(apply, caller)
  options = solvers.check_options(solvers.merge_options(
      solver_options, caller=caller, solver=solver, tolerance=tolerance,
      max_iterations=max_iterations, regularization=regularization,
      stepsize=stepsize), caller=caller)
  per_group_fn = grouping.group_value_and_grad(
      loss_fn, num_groups, has_aux=has_aux, argnums=argnums,
      batch_argnums=batch_argnums, chunk_size=chunk_size,
      grad_dtype=grad_dtype, split_sums=split_sums)
  batch_idx = grouping.batch_indices(batch_argnums, caller)
  multiple = not isinstance(argnums, int)
  diff_args = tuple(argnums) if multiple else (argnums,)

  def group_losses(args, kwargs, groups):
    """``[m]`` losses, the differentiated args shared by all groups."""
    def one(group_batches):
      out = loss_fn(*grouping.with_batches(args, batch_idx, group_batches),
                    **kwargs)
      return out[0] if has_aux else out
    return jax.vmap(one)(groups)

  def weighted_grad(args, kwargs, groups, weights):
    """Gradient of sum_i w_i L_i: one ordinary backward pass."""
    def weighted(*diff):
      full = list(args)
      for i, x in zip(diff_args, diff):
        full[i] = x
      losses = group_losses(full, kwargs, groups)
      return jnp.sum(weights.astype(losses.dtype) * losses)
    grads = jax.grad(weighted, argnums=tuple(range(len(diff_args))))(
        *(args[i] for i in diff_args))
    return grads if multiple else grads[0]

  def wrapped(*args, **kwargs):
    grouping.enough_positional(batch_idx, batch_argnums, args, caller)
    (out, per_group) = per_group_fn(*args, **kwargs)
    losses, aux = (out if has_aux else (out, None))
    mask = None
    if example_mask is not None:
      mask = grouping.group_mask_of(
          example_mask, [args[i] for i in batch_idx], num_groups, caller)
    groups = tuple(grouping.split_into_groups(args[i], num_groups)
                   for i in batch_idx)

    def second_pass(coefficients, step):
      # A non-finite group (weight 0) would still put 0 * NaN into the
      # second pass; give it the examples of the heaviest group instead
      # (still with weight 0). Branch-free: no lax.cond, so no host round
      # trip on a GPU.
      source = jnp.argmax(jax.lax.stop_gradient(step.solution.weights))
      valid = step.valid
      filled = jax.tree_util.tree_map(
          lambda x: jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x,
                              x[source]), groups)
      return weighted_grad(args, kwargs, filled,
                           jax.lax.stop_gradient(coefficients))

    step = mnp_lib.run(
        per_group, options, group_mask=mask, apply=apply,
        gram=_first_pass_gram(per_group, options.gram_backend),
        combine=second_pass, caller=caller)
    return GrainGrad(
        losses=losses, grads=step.update, weights=step.solution.weights,
        gram=step.gram, kkt_residual=step.solution.kkt_residual,
        num_iterations=step.solution.num_iterations, aux=aux,
        **step.statistics._asdict())

  return wrapped

