"""The markdown report (and its figure) of the stability study, rebuilt from
the JSON-lines result files alone."""

import pathlib
from typing import Sequence

import _stability_stats as stats  # pylint: disable=g-bad-import-order


def report(paths: Sequence[str]):
  """Writes the markdown report paths[0] (and a PNG beside it) from the
  JSON-lines result files paths[1:], one section per file."""
  md_path = pathlib.Path(paths[0])
  png = md_path.with_suffix('.png')
  all_runs = []
  sections = []
  for path in paths[1:]:
    runs, metas = stats.load([path])
    for meta in metas:
      if meta.get('stage') == 'main' and 'chosen_lr' in meta:
        for r in runs:
          if (r.get('stage') == 'main' and r['task'] == meta['task'] and
              r['regime'] == meta['regime'] and r['method'] == meta['method']):
            r['chosen_lr'] = meta['chosen_lr']
    all_runs += runs
    head = [m for m in metas if m.get('kind') == 'run']
    suite = head[0].get('suite') if head else '?'
    device = head[0].get('device', '?') if head else '?'
    title = (f'{suite} suite ({"CPU" if "cpu" in device.lower() else "GPU"} '
             f'results, {pathlib.Path(path).name})')
    notes = pathlib.Path(path).with_suffix('.notes.md')
    if notes.exists():
      head = head + [{'notes': notes.read_text()}]
    sections.append((title, runs, head))
  fig = stats.figure(all_runs, str(png),
                     title='Per-seed test scores, each method at its own '
                     'tuned learning rate')
  text = [stats.HEADER]
  for title, runs, head in sections:
    text.append(stats.markdown(runs, head, title=title,
                               figure=png.name if fig else None))
    fig = None  # the figure is shown once, in the first section
  md_path.write_text('\n'.join(text))
  print(f'wrote {md_path}' + (f' and {png}' if png.exists() else ''))
