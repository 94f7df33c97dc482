"""The markdown report (and its figures) of the stability study, rebuilt from
the JSON-lines result files alone. The regimes stage's runs (issue 24) get
their own sections and figure (_stability_regimes_report.py); the
hand-written sections of an existing report (the regimes protocol and
findings) are kept."""

import pathlib
from typing import Sequence

import _stability_regimes_report as regimes_report  # pylint: disable=g-bad-import-order
import _stability_stats as stats  # pylint: disable=g-bad-import-order


def report(paths: Sequence[str]):
  """Writes the markdown report paths[0] (and a PNG beside it) from the
  JSON-lines result files paths[1:], one section per file (regimes runs:
  a section of their own and REGIMES.png beside the report)."""
  md_path = pathlib.Path(paths[0])
  png = md_path.with_suffix('.png')
  regimes_png = md_path.with_name('REGIMES.png')
  kept = (regimes_report.hand_written_blocks(md_path.read_text())
          if md_path.exists() else None)
  all_runs = []
  sections = []
  regime_sections = []
  all_regimes = ([], [])
  for path in paths[1:]:
    runs, metas = stats.load([path])
    reg = [r for r in runs if r.get('stage') == 'regimes']
    runs = [r for r in runs if r.get('stage') != 'regimes']
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
    notes_path = pathlib.Path(path).with_suffix('.notes.md')
    notes = ([{'notes': notes_path.read_text()}] if notes_path.exists()
             else [])
    head = head + notes
    if reg:
      reg_metas = [m for m in metas if m.get('stage') == 'regimes'] + [
          m for m in metas if m.get('kind') == 'run']
      all_regimes[0].extend(reg)
      all_regimes[1].extend(reg_metas)
      regime_sections.append((f'Regimes study (issue 24): {suite} suite '
                              f'({pathlib.Path(path).name})', reg, reg_metas,
                              notes))
    if runs:
      sections.append((title, runs, head))
  fig = stats.figure(all_runs, str(png),
                     title='Per-seed test scores, each method at its own '
                     'tuned learning rate')
  text = [stats.HEADER]
  if kept:
    text.append(kept)
  for title, runs, head in sections:
    text.append(stats.markdown(runs, head, title=title,
                               figure=png.name if fig else None))
    fig = None  # the figure is shown once, in the first section
  rfig = (regimes_report.figure(*all_regimes, str(regimes_png))
          if regime_sections else None)
  for title, runs, metas, notes in regime_sections:
    section = regimes_report.markdown(
        runs, metas, title=title, figure=regimes_png.name if rfig else None)
    if notes:
      section = section.replace('\n\n', '\n\n' + notes[0]['notes'].strip()
                                + '\n\n', 1)
    text.append(section)
    rfig = None
  md_path.write_text('\n'.join(text))
  print(f'wrote {md_path}' + (f' and {png}' if png.exists() else '')
        + (f' and {regimes_png}' if regime_sections and regimes_png.exists()
           else ''))
