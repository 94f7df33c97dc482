"""The stability study (benchmarks/stability.py, issue 11): its statistics,
its arms, and a tiny end-to-end run of the sklearn suite (digits, breast
cancer, diabetes: one compiled program shared by the three tasks)."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'
sys.path.insert(0, str(BENCH))

import _stability_stats as st  # pylint: disable=g-import-not-at-top,wrong-import-position


# ---------------------------------------------------------------- statistics


def test_summary_and_worst_decile():
  s = st.summary(np.arange(20, dtype=float))
  assert s['n'] == 20 and s['min'] == 0 and s['max'] == 19
  assert s['worst_decile'] == 0.5            # mean of the worst 2 of 20
  assert s['std'] == pytest.approx(np.std(np.arange(20), ddof=1))


def test_brown_forsythe_agrees_with_scipy():
  from scipy import stats as scipy_stats
  rng = np.random.default_rng(0)
  a, b = rng.normal(0, 1, 20), rng.normal(0.5, 2.5, 20)
  c = rng.standard_t(3, 13)
  for samples in ((a, b), (a, b, c), (a, a + 1)):
    w, p = st.brown_forsythe(*samples)
    ref = scipy_stats.levene(*samples, center='median')
    assert w == pytest.approx(ref.statistic, rel=1e-10, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-8)


def test_bootstrap_cis_cover_the_truth_on_a_known_case():
  # Paired seeds: other = base + shift, spread x 2. The CIs must cover the
  # true values (2 and the shift) on most draws, and be centred near them.
  rng = np.random.default_rng(1)
  cover_ratio = cover_diff = 0
  trials = 40
  for t in range(trials):
    base = rng.normal(0.8, 0.02, 30)
    other = 0.8 + 2.0 * (base - 0.8) + 0.01 + rng.normal(0, 0.004, 30)
    r, lo, hi = st.std_ratio_ci(base, other, n_boot=800, seed=t)
    cover_ratio += lo <= 2.0 * np.sqrt(1 + (0.004 / 0.04) ** 2) <= hi
    d, dlo, dhi = st.mean_diff_ci(base, other, n_boot=800, seed=t)
    cover_diff += dlo <= 0.01 <= dhi
    assert lo <= r <= hi and dlo <= d <= dhi
  assert cover_ratio >= 0.8 * trials and cover_diff >= 0.8 * trials


def test_churn():
  p = np.array([[0, 1, 2, 1], [0, 1, 2, 1], [0, 1, 2, 1]])
  assert st.churn(p) == 0.0
  rng = np.random.default_rng(2)
  q = rng.integers(0, 3, (7, 50))
  assert st.churn(q) == pytest.approx(st.churn_pairs_reference(q))
  assert st.churn(np.array([[0, 0], [1, 1]])) == 1.0
  s = st.encode_predictions(q[0])
  assert np.array_equal(st.decode_predictions(s), q[0])


# ---------------------------------------------------------------- the arms


def test_arms_pick_mean_grain_and_the_rescaled_controls():
  import stability  # pylint: disable=g-import-not-at-top
  g = {'w': jnp.array([[1.0, 0.0], [-0.5, 1.0], [0.0, 0.0]])}
  params = {'w': jnp.zeros(2)}
  mask = jnp.array([True, True, False])   # the third group is left out

  @jax.jit
  def update(code):
    tx = stability.arm_transform(3, code)
    return tx.update(g, tx.init(params), params, group_mask=mask)

  out = {}
  for name, code in stability.ARM_CODE.items():
    out[name], state = update(jnp.int32(code))
  mean = np.array([0.25, 0.5])
  d = np.asarray(out['grain']['w'])
  np.testing.assert_allclose(out['mean']['w'], mean, atol=1e-6)
  # d is the min-norm point of the two groups: <d, g_i> >= ||d||^2.
  assert np.all(np.asarray(g['w'][:2]) @ d >= d @ d - 1e-6)
  nd, nm = np.linalg.norm(d), np.linalg.norm(mean)
  np.testing.assert_allclose(out['mean@grain-norm']['w'], mean * nd / nm,
                             rtol=1e-5)
  np.testing.assert_allclose(out['grain@mean-norm']['w'], d * nm / nd,
                             rtol=1e-5)
  assert float(state.norm_ratio) == pytest.approx(nd / nm, rel=1e-4)


def test_lane_plan_groups_cells():
  import stability  # pylint: disable=g-import-not-at-top
  cfg = stability.Config(cells=8, slots=4, window=2)
  comb, mask, active = stability.lane_plan(cfg, stability.Lane('grain', 1.0, 0,
                                                               m=4, k=1))
  assert active.tolist() == [True, False]
  np.testing.assert_allclose(comb[0, 0], [.5, .5, 0, 0, 0, 0, 0, 0])
  comb, mask, active = stability.lane_plan(cfg, stability.Lane('grain', 1.0, 0,
                                                               m=4, k=2))
  assert active.tolist() == [True, True] and mask.all()
  np.testing.assert_allclose(comb[1, 3], np.eye(8)[7])
  with pytest.raises(ValueError):
    stability.lane_plan(cfg, stability.Lane('grain', 1.0, 0, m=8, k=1))


# ---------------------------------------------------------------- end to end


def test_tiny_sklearn_suite_end_to_end(tmp_path):
  import stability  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'tiny.jsonl'
  # --sweep-groups 0: the sweep reuses the main program (one compile in all).
  stability.main(['--suite', 'sklearn', '--tiny', '--stages', 'main', 'sweep',
                  '--sweep-groups', '0', '--sweep-optimizer', 'adamw',
                  '--out', str(out)])
  runs, metas = st.load([out])
  assert {r['task'] for r in runs} == {'digits', 'breast_cancer', 'diabetes'}
  main = [r for r in runs if r['stage'] == 'main']
  assert {r['method'] for r in main} == {'mean', 'grain', 'grain+acc'}
  assert {r['split'] for r in main} == {'val', 'test'}
  assert {r['seed'] for r in main if r['split'] == 'val'}.isdisjoint(
      {r['seed'] for r in main if r['split'] == 'test'})
  sweep = [r for r in runs if r['stage'] == 'sweep']
  assert {r['method'] for r in sweep} == set(stability.ARMS)
  for r in runs:
    assert np.isfinite(r['metric']) or r['failed']
    if r['method'] != 'plain' and r['m'] > 1:
      assert 0.0 <= r['conflict_share'] <= 1.0
      assert r['norm_ratio'] <= 1.0 + 1e-4
  # Paired: at the same seed and lr, every arm saw the same data and init,
  # so at lr = 0 all arms give the same predictions -- checked indirectly:
  # the mean arm's metric does not depend on m/k bookkeeping.
  acc = [r for r in main if r['method'] == 'grain+acc']
  assert all('acc_conflict_share' in r for r in acc)
  chosen = [m for m in metas if 'chosen_lr' in m]
  assert len(chosen) == 9
  md = tmp_path / 'STABILITY.md'
  stability.report([str(md), str(out)])
  text = md.read_text()
  for heading in ('Learning-rate selection', 'Test scores', 'std ratio',
                  'Learning-rate sweep'):
    assert heading in text
  assert json.loads(out.read_text().splitlines()[-1])['kind'] == 'run'
