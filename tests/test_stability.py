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


# ---------------------------------------------------------------- regimes


def test_tiny_regimes_stage_end_to_end(tmp_path):
  """The regimes stage of issue 24 on the sklearn suite (tiny mode)."""
  import stability  # pylint: disable=g-import-not-at-top
  import _stability_regimes as rg  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'regimes.jsonl'
  argv = ['--suite', 'sklearn', '--tiny', '--stages', 'regimes',
          '--tasks', 'digits', '--out', str(out)]
  stability.main(argv)
  runs, metas = st.load([out])
  args = stability.parse_args(argv)
  problems = stability.build_problems(args)
  assert {r['stage'] for r in runs} == {'regimes'}
  assert {r['condition'] for r in runs} == {'noise', 'sources', 'imbalance'}
  assert {r['optimizer'] for r in runs} == {'adamw', 'sgdm'}
  val = {r['seed'] for r in runs if r['split'] == 'val'}
  test = {r['seed'] for r in runs if r['split'] == 'test'}
  assert val.isdisjoint(test) and test == set(range(args.seeds))
  for r in runs:
    assert np.isfinite(r['metric']) or r['failed']
    assert r['failed'] == (not np.isfinite(r['final_loss'])
                           or r['accuracy'] <= r['chance'] + 0.05)
  # Each arm at its own rate, chosen on validation from the grid.
  chosen = [m for m in metas if m.get('stage') == 'regimes'
            and 'chosen_lr' in m]
  for m in chosen:
    grid = problems[(m['task'], 'full')].regime_grids[m['optimizer']]
    assert m['chosen_lr'] in grid and len(m['val_scores']) == len(grid)
  assert len([m for m in metas if m.get('regimes_done')]) == 3 * 2

  # Noise: the flips are the seed's alone (same for every arm and lr), the
  # requested share, nested across fractions, and always to another class.
  noisy = [r for r in runs if r['condition'] == 'noise' and r['noise'] > 0]
  flips = {}
  for r in noisy:
    key = (r['task'], r['seed'], r['noise'])
    flips.setdefault(key, set()).add(tuple(r['flipped']))
    assert len(r['flipped']) == round(r['noise'] * r['n_train'])
  assert all(len(v) == 1 for v in flips.values())
  for (task, seed, nz), f in flips.items():
    if nz < max(args.noise):
      assert set(next(iter(f))) <= set(next(iter(
          flips[(task, seed, max(args.noise))])))
  p = problems[('digits', 'full')]
  sample, labels, flipped = rg.flips(p, 0, 0.4)
  y = np.asarray(p.y_pool)[sample].astype(int)
  assert flipped.sum() == round(0.4 * len(sample))
  assert np.all(labels[flipped] != y[flipped])
  assert np.all(labels[~flipped] == y[~flipped])
  order, lab, fl = rg.lane_data(p, stability.Lane('grain', 0.1, 0, 16, 1,
                                                  condition='noise',
                                                  noise=0.4), 2)
  assert set(order.ravel()) == set(sample)
  assert np.array_equal(fl.astype(bool), np.isin(order, sample[flipped]))
  ratios = [r['flip_weight_ratio'] for r in noisy if r['method'] == 'grain']
  assert ratios and all(np.isfinite(ratios)) and all(x > 0 for x in ratios)

  # Imbalance: the rare (last) class keeps --rare-shots, the others theirs.
  rare = rg.imbalanced_sample(p, 0, args.rare_shots)
  counts = np.bincount(np.asarray(p.y_pool)[rare].astype(int), minlength=10)
  assert counts[9] == args.rare_shots and np.all(counts[:9] == 5)
  assert {r['rare_class'] for r in runs if r['condition'] == 'imbalance'} == {
      '9'}

  # Sources: each batch is half of each source, in source order, so with
  # m = 2 every group is one source and with m = 4 two groups per source.
  parts = p.source_sample(0)
  order, _, _ = rg.lane_data(p, stability.Lane('grain', 0.1, 0, 2, 1,
                                               condition='sources'), 2)
  assert np.all(np.isin(order[:, :8], parts[0]))
  assert np.all(np.isin(order[:, 8:], parts[1]))
  src = [r for r in runs if r['condition'] == 'sources' and
         r['split'] == 'test']
  assert {r['m'] for r in src} == {2, 4}
  for r in src:
    assert r['metric'] == r['worst_source'] == min(
        r['source_accuracy'].values())

  # The mean arm does not depend on how the batch is grouped (m = 16 and
  # m = 4 at the same seed and rate give the same run) ...
  mean = {}
  for r in runs:
    if r['condition'] == 'noise' and r['method'] == 'mean':
      mean.setdefault((r['task'], r['optimizer'], r['noise'], r['lr'],
                       r['seed'], r['split']), {})[r['m']] = r['final_loss']
  pairs = [v for v in mean.values() if len(v) == 2]
  assert pairs and all(v[16] == pytest.approx(v[4], rel=1e-5)
                       for v in pairs)
  # ... and is plain AdamW / SGD on the batch gradient: its training-loss
  # trajectory equals that of the program with no groups at all.
  runner = stability.Runner(4, lambda msg: None)
  data = lambda prob, lane: rg.lane_data(prob, lane, 2)
  for opt, lr in (('adamw', 0.03), ('sgdm', 0.3)):
    lanes = [stability.Lane(arm, lr, 1, 16, 1, condition='noise', noise=0.4)
             for arm in ('mean', 'grain')]
    cfg = stability.Config(optimizer=opt, cells=16, slots=16, window=1,
                           variant='regimes', track_flips=True)
    grouped = runner.run(p, cfg, lanes, data)
    plain = runner.run(p, stability.Config(optimizer=opt, cells=0, slots=0,
                                           window=1), lanes[:1], data)
    np.testing.assert_allclose(grouped[0]['trace']['loss'],
                               plain[0]['trace']['loss'], rtol=2e-5)
    assert not np.allclose(grouped[1]['trace']['loss'],
                           plain[0]['trace']['loss'], rtol=1e-3)

  # Resume: a second run on the same file skips every finished job.
  n = len(out.read_text().splitlines())
  stability.main(argv)
  assert len([l for l in out.read_text().splitlines()[n:]
              if '"split"' in l]) == 0

  # The report: the hand-written protocol survives, the tables render.
  md = tmp_path / 'STABILITY.md'
  md.write_text('old\n<!-- regimes-protocol:start (hand-written; kept by '
                '--report) -->\nPROTOCOL TEXT\n<!-- regimes-protocol:end -->'
                '\nold tables\n<!-- regimes-findings:start (hand-written; kept '
                'by --report) -->\nFINDINGS TEXT\n<!-- regimes-findings:end -->'
                '\nmore old tables\n')
  stability.report([str(md), str(out)])
  text = md.read_text()
  assert 'PROTOCOL TEXT' in text and 'old tables' not in text
  assert text.index('PROTOCOL TEXT') < text.index('FINDINGS TEXT')
  for heading in ('Regimes study (issue 24): sklearn suite',
                  '### digits: noise (metric: accuracy)',
                  '### digits: sources (metric: worst_source)',
                  '### digits: imbalance (metric: worst_class)',
                  'grain − mean@grain-norm', 'flipped/clean weight',
                  'paired comparisons in this section'):
    assert heading in text
  assert (tmp_path / 'REGIMES.png').exists()
