"""Every benchmark runs in its tiny CPU configuration and reports sane rows."""

import importlib
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'benchmarks')
sys.path.insert(0, BENCH)


def _module(name):
  return importlib.import_module(name)


def test_step_overhead_tiny(tmp_path):
  out = tmp_path / 'step.jsonl'
  rows = _module('step_overhead').main(
      ['--config', 'tiny', '--groups', '2', '--modes', 'lean',
       '--inner', '1', '--reps', '1', '--json', str(out)])
  assert [(r['mode'], r['m']) for r in rows] == [('mean', 1), ('lean', 2)]
  for r in rows:
    assert r['ms'] > 0 and r['peak_bytes'] > 0
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert lines[-1]['benchmark'] == 'step_overhead_summary'


def test_group_reductions_tiny(tmp_path):
  rows = _module('group_reductions').main(
      ['--tokens', '4096', '--width', '64', '--groups', '4', '--json',
       str(tmp_path / 'gr.jsonl')])
  assert [(r['variant'], r['m']) for r in rows] == [
      ('elementwise', 1), ('mean', 1), ('group', 4), ('group_split', 4)]
  for r in rows:
    assert r['us'] > 0
  # The two-stage sum is the one-stage sum (bf16 sums of 1024 normals: the
  # values reach about 100, where a bf16 step is 0.5).
  assert rows[-1]['max_abs_diff_vs_group'] <= 1.0


def test_qp_solvers_tiny(tmp_path):
  rows = _module('qp_solvers').main(
      ['--config', 'tiny', '--sizes', '2', '4', '--grams', '1',
       '--budget_s', '0.01', '--json', str(tmp_path / 'qp.jsonl')])
  import grain_optax  # pylint: disable=g-import-not-at-top
  assert {r['solver'] for r in rows} == set(grain_optax.SOLVERS)
  for r in rows:
    assert r['iterations'] >= 1
    if r['solver'] == 'exact':
      assert r['kkt'] <= 1e-6


def test_memory_tiny(tmp_path):
  rows = _module('memory').main(
      ['--config', 'tiny', '--groups', '2', '--modes', 'grain', '--json',
       str(tmp_path / 'mem.jsonl')])
  assert [r['mode'] for r in rows] == ['mean', 'grain']
  assert rows[0]['xla_ratio'] == 1.0
  assert all(r['xla_peak_bytes'] > 0 for r in rows)


def test_peer_torchjd_tiny(tmp_path):
  if importlib.util.find_spec('torch') is None:
    # CI has no PyTorch: the peer benchmark must say what it needs.
    with pytest.raises(SystemExit, match='needs PyTorch'):
      _module('peer_torchjd').main(['--config', 'tiny'])
    return
  rows = _module('peer_torchjd').main(
      ['--config', 'tiny', '--groups', '2', '--inner', '1', '--reps', '1',
       '--json', str(tmp_path / 'peer.jsonl')])
  assert rows[0]['step'] == 'torch mean' and rows[0]['ms'] > 0


def test_host_profile_tiny(tmp_path):
  # The MiniLM step (one layer, batch 4 x 16) timed and traced on the CPU:
  # one row with the step's wall clock, dispatch time and HLO counts.
  out = tmp_path / 'host.jsonl'
  row = _module('host_profile').main(
      ['--tiny', '--mode', 'lora', '--method', 'monitor', '--json', str(out)])
  assert row['method'] == 'monitor' and row['groups'] == 2
  assert row['ms_per_step'] > 0 and row['dispatch_ms'] > 0
  assert row['input_leaves'] > 50   # the flat list of the state's arrays
  assert json.loads(out.read_text().splitlines()[-1])['label'] == ''


def test_command_buffers_lowered_for_cuda_tiny(tmp_path):
  # Lowered for a GPU on the CPU, nothing run: the donating step takes the
  # state's leaves and the batch's, and every state leaf aliases an output.
  out = tmp_path / 'cb.jsonl'
  row = _module('command_buffers').main(
      ['--tiny', '--lowered-for', 'cuda', '--method', 'grain', '--json',
       str(out)])
  assert row['inputs'] == row['state_leaves'] + row['data_inputs']
  assert row['aliased'] == row['state_leaves'] > 50
  assert row['dot_gflop'] > 0
  # The largest tensors, by bytes: LoRA leaves the word embedding frozen,
  # so its table leads; full fine-tuning adds its per-group (m = 2)
  # gradients, in the backward's bf16.
  sizes = [mb for _, mb in row['largest_tensors']]
  assert sizes == sorted(sizes, reverse=True)
  assert row['largest_tensors'][0] == ['30522x384xf32', 46.9]
  assert not any(t.startswith('2x30522') for t, _ in row['largest_tensors'])
  full = _module('command_buffers').main(
      ['--tiny', '--lowered-for', 'cuda', '--method', 'grain', '--mode',
       'full'])
  assert ['2x30522x384xbf16', 46.9] in full['largest_tensors'][:2]
  assert json.loads(out.read_text().splitlines()[-1]) == row


def test_finetune_step_time_tiny(tmp_path):
  # The issue-23 harness: the mean and GRAIN with the metrics carried in the
  # donated state, fixed and streamed batches, the garbage collector frozen,
  # one JSON line per row.
  out = tmp_path / 'fst.jsonl'
  rows = _module('finetune_step_time').main(
      ['--tiny', '--modes', 'lora', '--metrics-in-state', '--feed',
       'fixed,stream', '--gc', 'frozen', '--chunks', '2', '--json',
       str(out)])
  assert [(r['method'], r['groups']) for r in rows] == [('mean', 1),
                                                        ('grain', 2)]
  for row in rows:
    assert row['metrics_in_state'] and row['mode'] == 'lora'
    # Each repeat's 2 steps taken as 2 chunks of 1, the rows in turn.
    assert (row['steps'], row['chunks']) == (2, 2)
    assert row['gc'] == 'frozen'
    # Frozen and disabled while timing: no collection lands in a repeat.
    assert not any(row['gc_collections_by_generation'])
    assert set(row['ms_per_step_by_feed']) == {'fixed', 'stream'}
    assert all(t > 0 for t in row['ms_per_step_repeats'])
    assert row['loss'] == row['loss'] and 0 < row['loss'] < 10
    assert row['repeat_spread'] == 0  # one repeat: at its own median
    base = rows[0]['ms_repeats_by_feed']
    for feed, times in row['ms_repeats_by_feed'].items():
      assert row['round_ratios_by_feed'][feed] == pytest.approx(
          [t / b for t, b in zip(times, base[feed])])
      # The host's part of a repeat: handing the calls over ends before
      # the last step does.
      dispatch = row['ms_dispatch_repeats_by_feed'][feed]
      assert len(dispatch) == len(times)
      assert all(0 < d <= t for d, t in zip(dispatch, times))
      assert len(row['repeat_start_unix_by_feed'][feed]) == len(times)
  # The configurations take their repeats in turn, in the order built.
  firsts = [r['repeat_start_unix_by_feed']['fixed'][0] for r in rows]
  assert firsts == sorted(firsts)
  written = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r for r in written if 'mode' in r] == rows


@pytest.mark.parametrize('interleave', ['rows', 'off'])
def test_finetune_step_time_order_of_repeats(interleave):
  # 'rows': the configurations take their repeats in turn, so the mean's
  # second repeat comes after GRAIN's first; 'off': all of the mean's
  # repeats first, as a training loop runs one step function.
  mean, grain = _module('finetune_step_time').main(
      ['--tiny', '--modes', 'lora', '--repeats', '2', '--interleave',
       interleave])
  assert (mean['interleave'], len(mean['ms_per_step_repeats'])) == (
      interleave, 2)
  mean_starts = mean['repeat_start_unix_by_feed']['fixed']
  grain_first = grain['repeat_start_unix_by_feed']['fixed'][0]
  assert (mean_starts[1] > grain_first) == (interleave == 'rows')
  assert mean_starts[0] < grain_first


def test_finetune_step_time_steps_per_call():
  # --steps-per-call 1,2: every configuration once per K (K steps a call,
  # in a lax.scan), each timed over the same steps and set against the mean
  # of its own K.
  rows = _module('finetune_step_time').main(
      ['--tiny', '--modes', 'lora', '--steps-per-call', '1,2', '--stats',
       'packed'])
  assert [(r['method'], r['steps_per_call']) for r in rows] == [
      ('mean', 1), ('grain', 1), ('mean', 2), ('grain', 2)]
  for row in rows:
    assert row['steps'] == 4  # --tiny: 2 calls of the largest K
    assert 0 < row['loss'] < 10
    base = rows[0 if row['steps_per_call'] == 1 else 2]
    assert row['ratio_to_mean'] == pytest.approx(
        row['ms_per_step'] / base['ms_per_step'])


def test_finetune_step_time_steps_per_call_must_divide(capsys):
  with pytest.raises(SystemExit):
    _module('finetune_step_time').main(
        ['--modes', 'lora', '--steps', '30', '--steps-per-call', '4'])
  assert '--steps-per-call must be at least 1 and divide --warmup (5)' in (
      capsys.readouterr().err)


def test_finetune_step_time_chunks_must_divide_steps(capsys):
  with pytest.raises(SystemExit):
    _module('finetune_step_time').main(['--tiny', '--chunks', '3'])
  assert '--chunks must be at least 1 and divide --steps (2)' in (
      capsys.readouterr().err)


def test_finetune_step_time_host_shares():
  # An outlier is a repeat more than 10 % above its set's median; each
  # repeat's host share is its dispatch time over its wall clock.
  rows = [{'ms_repeats_by_feed': {'fixed': [2.0, 2.0, 3.0]},
           'ms_dispatch_repeats_by_feed': {'fixed': [0.5, 1.0, 2.7]}}]
  slow, rest = _module('finetune_step_time').host_shares(rows)
  assert slow == pytest.approx([0.9])
  assert rest == pytest.approx([0.25, 0.5])


def test_finetune_step_time_repeat_spread():
  # Issue 23's bar: every repeat within 10 % of the repeats' median.
  spread = _module('finetune_step_time').repeat_spread
  assert spread([2.0, 2.2, 1.9]) == pytest.approx(0.1)
  assert spread([3.0, 2.0, 2.0, 2.0]) == pytest.approx(0.5)
  assert spread([2.5]) == 0


def test_repeat_timeline_finds_spells(tmp_path):
  # Two rows taking 4 repeats in turn; the third round ran slow for both (a
  # spell of the machine), so each slow repeat has a slow neighbour in time.
  def row(method, times, offset):
    return {'mode': 'lora', 'method': method, 'groups': 4,
            'ms_repeats_by_feed': {'fixed': times},
            'repeat_start_unix_by_feed': {
                'fixed': [1000.0 + 0.2 * k + offset for k in range(4)]},
            'steps': 30, 'chunks': 1}
  rows = [row('mean', [2.0, 2.0, 2.6, 2.0], 0.0),
          row('grain', [3.0, 3.0, 3.9, 3.1], 0.1)]
  path = tmp_path / 'rows.jsonl'
  path.write_text('{"env": {}}\n' + ''.join(json.dumps(r) + '\n'
                                           for r in rows))
  clocks = tmp_path / 'gpu_clocks.csv'
  clocks.write_text(
      'timestamp, clocks.current.sm [MHz], reasons\n'
      + ''.join(f'1970/01/01 00:16:{40 + k / 10:06.3f}, {1980 - 500 * (k == 4)}'
                f' MHz, 0x0\n' for k in range(8)))
  summary = _module('repeat_timeline').main(
      [str(path), '--clocks', str(clocks), '--quiet'])
  assert (summary['repeats'], summary['slow']) == (8, 2)
  assert summary['neighbour_slow_given_slow'] == 0.5
  # Of the six others' ten neighbours, two are slow (those next to round 3).
  assert summary['neighbour_slow_given_not_slow'] == pytest.approx(0.2)
  # The slow repeats ran while the clock log dipped (sample at 1000.4 s).
  assert summary['sm_mhz_slow'] < summary['sm_mhz_other'] < 1980
  assert summary['sm_mhz_min'] == 1480
