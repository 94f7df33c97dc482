"""grain_optax: GRAIN (Group Aggregation via min-norm objective) for optax.

GRAIN replaces the mean of group gradients with their minimum-norm convex
combination, ``d = sum_i w_i g_i`` with ``w = argmin_{w in simplex} ||d||^2``,
which has a non-negative inner product with every group gradient.

References:
  GRAIN: Group Aggregation via min-norm objective, arXiv:2606.22917.
"""

from grain_optax._src.accumulate import accumulate
from grain_optax._src.combine import combine
from grain_optax._src.gram import gram_matrix
from grain_optax._src.grouping import group_value_and_grad
from grain_optax._src.grouping import split_into_groups
from grain_optax._src.lean import grain_value_and_grad
from grain_optax._src.lean import GrainGrad
from grain_optax._src.metrics import metrics
from grain_optax._src.min_norm_point import min_norm_point
from grain_optax._src.min_norm_point import MinNormPoint
from grain_optax._src.nnx import nnx_group_value_and_grad
from grain_optax._src.row_sparse import RowSparse
from grain_optax._src.solvers import kkt_residual
from grain_optax._src.solvers import min_norm_weights
from grain_optax._src.solvers import MinNormSolution
from grain_optax._src.solvers import SOLVERS
from grain_optax._src.solvers import SolverOptions
from grain_optax._src.state import AccumulateState
from grain_optax._src.state import grain_statistics
from grain_optax._src.state import GrainState
from grain_optax._src.transform import grain

__version__ = '0.1.0'

__all__ = (
    'accumulate',
    'AccumulateState',
    'combine',
    'grain',
    'grain_statistics',
    'GrainGrad',
    'GrainState',
    'grain_value_and_grad',
    'gram_matrix',
    'group_value_and_grad',
    'kkt_residual',
    'metrics',
    'min_norm_point',
    'min_norm_weights',
    'MinNormPoint',
    'MinNormSolution',
    'nnx_group_value_and_grad',
    'RowSparse',
    'SOLVERS',
    'SolverOptions',
    'split_into_groups',
)
