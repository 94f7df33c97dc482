"""An independent float64 reference for the min-norm simplex QP (test only).

Uses the reformulation  min_{u >= 0} u^T (K + 1 1^T) u - 2 1^T u  (a
non-negative least-squares problem), solved by scipy's Lawson-Hanson NNLS in
float64; w = u / sum(u). For a fixed direction w on the simplex and t = sum(u),
the objective t^2 w^T K w + (t - 1)^2 is minimised at t = 1 / (1 + w^T K w)
with value w^T K w / (1 + w^T K w), increasing in w^T K w, so both problems
have the same minimisers.
"""

import numpy as np
import scipy.optimize


def reference_weights(gram):
  k = np.asarray(gram, np.float64)
  k = 0.5 * (k + k.T)
  scale = np.max(np.diag(k))
  m = k.shape[0]
  if scale <= 0:
    return np.full(m, 1.0 / m)
  k = k / scale
  evals, evecs = np.linalg.eigh(k)
  factor = np.sqrt(np.clip(evals, 0.0, None))[:, None] * evecs.T
  a = np.vstack([factor, np.ones((1, m))])
  b = np.zeros(m + 1)
  b[-1] = 1.0
  u, _ = scipy.optimize.nnls(a, b, maxiter=50 * m)
  return u / u.sum()


def objective(gram, w):
  k = np.asarray(gram, np.float64)
  scale = np.max(np.diag(k))
  k = k / scale if scale > 0 else k
  w = np.asarray(w, np.float64)
  return float(w @ k @ w)


def kkt_gap(gram, w):
  """max_i (w'Kw - (Kw)_i) / max diag, in float64."""
  k = np.asarray(gram, np.float64)
  scale = np.max(np.diag(k))
  k = k / scale if scale > 0 else k
  w = np.asarray(w, np.float64)
  kw = k @ w
  return float(np.max(w @ kw - kw))
