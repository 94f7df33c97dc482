"""When the slow repeats of ``finetune_step_time.py`` ran, and what else ran slow.

Reads the JSON lines of one ``finetune_step_time.py`` process (rows with
``repeat_start_unix_by_feed``) and, if given, the GPU clock log
(``nvidia-smi --query-gpu=timestamp,clocks.sm,...`` as ``run_gpu.sh``'s
``short_table`` stage writes it) and the host load log (``host_load.txt``:
Unix time, ``/proc/stat``'s first line, the load average). Prints every
repeat in the order it ran, with its time over its row's median, and a
summary: how often a repeat's neighbours in time (other rows' repeats, the
next and the previous) ran slow too when it did and when it did not; the
GPU's SM clock and the host's steal time during the slow repeats and the
others.

    python benchmarks/repeat_timeline.py results/.../short_table_bfloat16.jsonl \\
        --clocks results/.../gpu_clocks.csv --load results/.../host_load.txt
"""

import argparse
import datetime
import json
import statistics
from typing import NamedTuple

SLOW = 1.1  # a repeat more than 10 % above its row's median (issue 23's bar)


class Repeat(NamedTuple):
  """One timed repeat of one row and feed."""
  start: float  # Unix seconds, host clock
  name: str  # the row, e.g. 'lora grain m=4'
  feed: str
  ratio: float  # its ms per step over its row's median
  ms: float  # its ms per step


def repeats(rows):
  """Every repeat of every row as a Repeat, in the order they ran."""
  out = []
  for row in rows:
    name = (f"{row['mode']} {row['method']}"
            + (f" m={row['groups']}" if row['method'] != 'mean' else ''))
    for feed, times in row['ms_repeats_by_feed'].items():
      median = statistics.median(times)
      starts = row['repeat_start_unix_by_feed'][feed]
      out += [Repeat(s, name, feed, t / median, t)
              for s, t in zip(starts, times)]
  return sorted(out)


def neighbour_odds(timeline, slow=SLOW):
  """Of the slow repeats and of the others, the share whose neighbours in
  time (the repeats right before and after, other rows) were slow too."""
  counts = {True: [0, 0], False: [0, 0]}
  for i, repeat in enumerate(timeline):
    for j in (i - 1, i + 1):
      if 0 <= j < len(timeline):
        counts[repeat.ratio > slow][0] += timeline[j].ratio > slow
        counts[repeat.ratio > slow][1] += 1
  return {k: (n / d if d else None) for k, (n, d) in counts.items()}


def read_clocks(path):
  """(Unix time, SM MHz, throttle reasons) from nvidia-smi's CSV log."""
  out = []
  with open(path) as f:
    for line in f:
      parts = [p.strip() for p in line.split(',')]
      try:
        t = datetime.datetime.strptime(parts[0], '%Y/%m/%d %H:%M:%S.%f')
        sm = float(parts[1].split()[0])
      except (ValueError, IndexError):
        continue  # the header, or a line cut off when the sampler stopped
      out.append((t.replace(tzinfo=datetime.timezone.utc).timestamp(), sm,
                  parts[-1]))
  return out


def read_load(path):
  """(Unix time, /proc/stat cpu counters) from host_load.txt."""
  out = []
  with open(path) as f:
    for line in f:
      parts = line.split()
      try:
        out.append((float(parts[0]), [int(x) for x in parts[2:10]]))
      except (ValueError, IndexError):
        continue
  return out


def window_stats(start, seconds, clocks, load):
  """Mean SM clock and the host's steal share over [start, start + s]."""
  sm = [c[1] for c in clocks if start - 0.1 <= c[0] <= start + seconds + 0.1]
  stats = [s for s in load if start - 0.5 <= s[0] <= start + seconds + 0.5]
  steal = None
  if len(stats) >= 2:
    first, last = stats[0][1], stats[-1][1]
    total = sum(last) - sum(first)
    steal = (last[7] - first[7]) / total if total else 0.0
  return (statistics.mean(sm) if sm else None), steal


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('jsonl')
  p.add_argument('--clocks', default=None, help='gpu_clocks.csv')
  p.add_argument('--load', default=None, help='host_load.txt')
  p.add_argument('--quiet', action='store_true', help='summary only')
  args = p.parse_args(argv)
  with open(args.jsonl) as f:
    rows = [r for r in map(json.loads, f) if 'mode' in r]
  timeline = repeats(rows)
  clocks = read_clocks(args.clocks) if args.clocks else []
  load = read_load(args.load) if args.load else []
  # A repeat's window: its steps in one piece, or its first chunk where the
  # repeat was taken in chunks (its later chunks come a round later).
  steps = rows[0].get('steps', 30) // rows[0].get('chunks', 1)
  t0 = timeline[0].start
  sm_of = {True: [], False: []}
  steal_of = {True: [], False: []}
  for start, name, feed, ratio, ms in timeline:
    seconds = ms * steps / 1e3
    sm, steal = window_stats(start, seconds, clocks, load)
    if sm is not None:
      sm_of[ratio > SLOW].append(sm)
    if steal is not None:
      steal_of[ratio > SLOW].append(steal)
    if not args.quiet:
      bar = '#' * int(max(0.0, ratio - 1) * 50)
      print(f'{start - t0:8.3f} s  {name:<17}{feed:<8}{ratio:6.2f} {bar}')
  odds = neighbour_odds(timeline)
  slow = sum(r.ratio > SLOW for r in timeline)
  summary = {
      'repeats': len(timeline), 'slow': slow,
      'neighbour_slow_given_slow': odds[True],
      'neighbour_slow_given_not_slow': odds[False],
      'sm_mhz_slow': statistics.mean(sm_of[True]) if sm_of[True] else None,
      'sm_mhz_other': statistics.mean(sm_of[False]) if sm_of[False] else None,
      'sm_mhz_min': min((c[1] for c in clocks), default=None),
      'throttle_reasons': sorted({c[2] for c in clocks}),
      'steal_slow': max(steal_of[True], default=None),
      'steal_other': max(steal_of[False], default=None)}
  print(f"{slow} of {len(timeline)} repeats more than 10 % above their "
        f"row's median; a neighbour in time slow too: "
        f"{odds[True] or 0:.0%} of the slow ones' against "
        f"{odds[False] or 0:.0%} of the others'")
  if clocks:
    print(f"SM clock: {summary['sm_mhz_slow']} MHz in the slow repeats, "
          f"{summary['sm_mhz_other']} MHz in the others (lowest sample "
          f"{summary['sm_mhz_min']}); throttle reasons seen "
          f"{summary['throttle_reasons']}")
  if load:
    print(f"host steal time: at most {summary['steal_slow']} of the CPU "
          f"time in a slow repeat, {summary['steal_other']} in the others")
  print(json.dumps(summary))
  return summary


if __name__ == '__main__':
  main()
