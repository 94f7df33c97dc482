"""The report of the regimes stage (issue 24): tables, verdicts and the
figure, from the JSON-lines records alone (see _stability_regimes.py).

Verdicts follow the pre-registered rule of benchmarks/STABILITY.md (section
"Regimes study (issue 24): pre-registered protocol"): per task, condition,
setting and optimizer, each arm at its own learning rate, paired by seed:

* "GRAIN helps": the 95 % bootstrap CI of grain - mean is above 0;
  "... and its direction helps" if also grain@mean-norm - mean's or
  grain - mean@grain-norm's CI is above 0;
* "GRAIN hurts": grain - mean's CI is below 0;
* otherwise "no detectable difference", with the smallest difference the
  seeds could detect (80 % power, two-sided 5 %): 2.80 x the paired
  differences' std / sqrt(n).
"""

import collections
import math
from typing import Dict, List, Optional

import numpy as np

import _stability_stats as stats  # pylint: disable=g-bad-import-order

PROTOCOL_START = '<!-- regimes-protocol:start (hand-written; kept by --report) -->'
PROTOCOL_END = '<!-- regimes-protocol:end -->'
# Hand-written blocks a regenerated report keeps, in this order: the protocol
# (fixed before the runs) and the findings (written after them, by the
# protocol's rule).
HAND_WRITTEN = ((PROTOCOL_START, PROTOCOL_END),
                ('<!-- regimes-findings:start (hand-written; kept by --report) -->',
                 '<!-- regimes-findings:end -->'))
ARMS = ('mean', 'grain', 'mean@grain-norm', 'grain@mean-norm')
# (label, base arm, other arm): paired differences other - base.
CONTRASTS = (('grain − mean', 'mean', 'grain'),
             ('grain@mean-norm − mean', 'mean', 'grain@mean-norm'),
             ('grain − mean@grain-norm', 'mean@grain-norm', 'grain'))
Z_DETECT = 1.959964 + 0.841621    # two-sided 5 %, 80 % power


def hand_written_blocks(text: str) -> Optional[str]:
  """The hand-written sections of an existing report (the protocol, then the
  findings), if any."""
  blocks = []
  for start, end in HAND_WRITTEN:
    i, j = text.find(start), text.find(end)
    if 0 <= i < j:
      blocks.append(text[i:j + len(end)] + '\n')
  return '\n'.join(blocks) or None


def select(runs: List[dict], metas: List[dict]):
  """The regimes runs to report: per job, the attempt that finished it, or
  else the latest attempt (a resumed job reruns from its start)."""
  done = {m['job']: m['attempt'] for m in metas if m.get('regimes_done')}
  latest = {}
  for r in runs:
    latest[r['job']] = max(latest.get(r['job'], ''), r['attempt'])
  keep = [r for r in runs if r['attempt'] == done.get(r['job'],
                                                      latest[r['job']])]
  chosen = {}
  for m in metas:
    if m.get('stage') == 'regimes' and 'chosen_lr' in m and m[
        'attempt'] == done.get(m['job'], latest.get(m['job'])):
      chosen[(m['task'], m['condition'], m['optimizer'], m['noise'], m['m'],
              m['method'])] = m
  return keep, chosen


def _key(r):
  return (r['task'], r['condition'], r['optimizer'], r['noise'], r['m'])


def _ci(x):
  d, lo, hi = x
  return f'{d:+.3f} [{lo:+.3f}, {hi:+.3f}]'


def contrasts(test: List[dict]) -> Dict[str, tuple]:
  """Paired differences (mean, CI low, CI high, n, sd) of one setting."""
  by_arm = {a: {r['seed']: stats.metric(r) for r in test if r['method'] == a}
            for a in ARMS}
  out = {}
  for label, base, other in CONTRASTS:
    seeds = sorted(set(by_arm[base]) & set(by_arm[other]))
    if len(seeds) < 3:
      continue
    xb = np.nan_to_num([by_arm[base][s] for s in seeds], nan=0.0)
    xo = np.nan_to_num([by_arm[other][s] for s in seeds], nan=0.0)
    d, lo, hi = stats.mean_diff_ci(xb, xo)
    out[label] = (d, lo, hi, len(seeds), float(np.std(xo - xb, ddof=1)))
  return out


def verdict(c: Dict[str, tuple]) -> str:
  if 'grain − mean' not in c:
    return '–'
  _, lo, hi, n, sd = c['grain − mean']
  if lo > 0:
    direction = any(c[k][1] > 0 for k in CONTRASTS_DIRECTION if k in c)
    return ('GRAIN helps, and its direction helps' if direction
            else 'GRAIN helps (not shown to be its direction)')
  if hi < 0:
    return 'GRAIN hurts'
  detectable = Z_DETECT * sd / math.sqrt(n)
  return f'no detectable difference (detectable: ±{detectable:.3f})'


CONTRASTS_DIRECTION = ('grain@mean-norm − mean', 'grain − mean@grain-norm')


def markdown(runs: List[dict], metas: List[dict], *, title: str,
             figure: Optional[str] = None) -> str:
  """The markdown section of one result file's regimes runs."""
  runs, chosen = select(runs, metas)
  out = [f'## {title}', '']
  for meta in metas:
    if meta.get('kind') == 'run':
      out += ['Command:', '', '```bash', meta['command'], '```', '',
              f'Device and versions: {meta.get("device")}, jax '
              f'{meta.get("jax")}, date {meta.get("date")}; wall time '
              f'{meta.get("elapsed_s", float("nan")):.0f} s'
              + (f' (stopped: {meta["stopped"]})' if meta.get('stopped')
                 else '') + '.', '']
  infos = {m['job']: m for m in metas if m.get('regimes_done')}
  if figure:
    out += [f'![paired differences vs mean]({figure})', '']
  n_cmp = 0
  jobs = collections.OrderedDict()
  for r in runs:
    jobs.setdefault((r['task'], r['condition']), []).append(r)
  for (task, condition), rs in jobs.items():
    metric = rs[0]['metric_name']
    out += [f'### {task}: {condition} (metric: {metric})', '']
    for job, info in infos.items():
      if job.startswith(f'{task}/') and f'/{condition}/' in job:
        if info.get('source_rule'):
          out += [f'Sources: {info["source_rule"]}.', '']
        if info.get('rare_class'):
          out += [f'Rare class: {info["rare_class"]}.', '']
        break
    out += ['| optimizer | setting | arm | lr (val) | n | mean | std | '
            'worst seed | failed | accuracy | macro acc. | worst class | '
            'per source | flipped/clean weight |',
            '|' + '---|' * 14]
    settings = collections.OrderedDict()
    for r in rs:
      settings.setdefault(_key(r), []).append(r)
    for key, srs in settings.items():
      test = [r for r in srs if r['split'] == 'test']
      for arm in ARMS:
        t = [r for r in test if r['method'] == arm]
        meta = chosen.get(key[:5] + (arm,))
        lr = '–'
        if meta:
          val = meta['val_scores'].get(f'{meta["chosen_lr"]:g}', float('nan'))
          lr = f'{stats._lr(meta["chosen_lr"])} ({val:.3f})'  # pylint: disable=protected-access
        if not t:
          out.append(f'| {key[2]} | {srs[0]["setting"]} | {arm} | {lr} | 0 '
                     + '| – ' * 9 + '|')
          continue
        s = stats.summary([stats.metric(r) for r in t])
        avg = lambda name, t=t: stats._nanmean([r.get(name) for r in t])  # pylint: disable=protected-access
        src = ''
        if t[0].get('source_accuracy'):
          src = ', '.join(
              f'{n}: {stats._f(stats._nanmean([r["source_accuracy"][n] for r in t]))}'  # pylint: disable=protected-access
              for n in t[0]['source_accuracy'])
        out.append(
            f'| {key[2]} | {srs[0]["setting"]} | {arm} | {lr} | {s["n"]} | '
            f'{stats._f(s["mean"])} | {stats._f(s["std"])} | '  # pylint: disable=protected-access
            f'{stats._f(s["min"])} | {sum(r["failed"] for r in t)} | '  # pylint: disable=protected-access
            f'{stats._f(avg("accuracy"))} | {stats._f(avg("macro_accuracy"))} | '  # pylint: disable=protected-access
            f'{stats._f(avg("worst_class"))} | {src or "–"} | '  # pylint: disable=protected-access
            f'{stats._f(avg("flip_weight_ratio"), 2) if arm == "grain" else "–"} |')  # pylint: disable=protected-access
    out += ['', 'Paired differences (test seeds, each arm at its own learning '
            'rate; 95 % bootstrap CIs):', '',
            '| optimizer | setting | ' + ' | '.join(c[0] for c in CONTRASTS)
            + ' | verdict |', '|' + '---|' * (len(CONTRASTS) + 3)]
    for key, srs in settings.items():
      c = contrasts([r for r in srs if r['split'] == 'test'])
      n_cmp += len(c)
      cols = ' | '.join(_ci(c[l][:3]) if l in c else '–'
                        for l, *_ in CONTRASTS)
      out.append(f'| {key[2]} | {srs[0]["setting"]} | {cols} | '
                 f'{verdict(c)} |')
    out.append('')
  out += [f'{n_cmp} paired comparisons in this section: at 95 % each, about '
          f'{0.05 * n_cmp:.1f} would exclude 0 by chance alone; a single CI '
          'above or below 0 among them is not a finding on its own.', '']
  return '\n'.join(out)


def figure(runs: List[dict], metas: List[dict], path: str) -> Optional[str]:
  """Paired differences vs the mean with their CIs, per task, condition,
  setting and optimizer (one row each), for the three contrasts."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  runs, _ = select(runs, metas)
  rows = collections.OrderedDict()
  for r in runs:
    if r['split'] == 'test':
      rows.setdefault(_key(r) + (r['setting'],), []).append(r)
  if not rows:
    return None
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
  labels = []
  for i, (key, rs) in enumerate(rows.items()):
    c = contrasts(rs)
    for j, (label, *_) in enumerate(CONTRASTS):
      if label in c:
        d, lo, hi = c[label][:3]
        y = i + (j - 1) * 0.25
        ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt='o', ms=4,
                    color=f'C{j}', label=label if i == 0 else None)
    labels.append(f'{key[0]} {key[1]} {key[2]}: {key[5]}')
  ax.axvline(0, color='k', lw=0.8)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel('paired difference of the condition\'s metric (test seeds)')
  ax.set_title('Regimes (issue 24): each arm at its own learning rate')
  ax.legend(fontsize=7, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
