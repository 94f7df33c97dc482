"""Claims of the docs that numbers or the code can check (issue 26 N8)."""

import pathlib
import re

import grain_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_grain_grad_docstring_says_nan_when_every_group_is_non_finite():
  # The code returns NaN (test_lean.py::
  # test_all_groups_non_finite_gives_a_nan_update_that_apply_if_finite_skips);
  # the docstring said "all zeros".
  doc = ' '.join(grain_optax.GrainGrad.__doc__.split())
  assert 'all NaN if every group that takes part is non-finite' in doc
  assert 'all zeros if every group is non-finite' not in doc


def test_when_grain_helps_ratios_match_their_norm_ratios():
  text = ' '.join((ROOT / 'docs' / 'when_grain_helps.md').read_text().split())
  found = re.search(r'([\d.]+)–([\d.]+)× shorter than the mean\'s '
                    r'\(`norm_ratio` ([\d.]+)–([\d.]+)\)', text)
  assert found, 'the "× shorter (norm_ratio ...)" sentence moved'
  short, long_, low, high = map(float, found.groups())
  assert round(1 / high, 1) == short and round(1 / low, 1) == long_
  # The plain step's cost range covers every GRAIN cell of the performance
  # guide's MiniLM table.
  found = re.search(r'×([\d.]+)–([\d.]+) in the plain training step', text)
  assert found
  table = (ROOT / 'docs' / 'guides' / 'performance.md').read_text()
  rows = re.findall(r'^\| (?:full|LoRA r=8) \| [^|]+\| [\d.]+ \|(.*)\|$',
                    table, re.M)
  cells = [float(x) for row in rows for x in re.findall(r'×([\d.]+)', row)]
  assert len(cells) == 12
  assert (min(cells), max(cells)) == tuple(map(float, found.groups()))


def test_readme_states_no_test_count():
  # A count goes stale with every test added or merged (it said 260 when the
  # suite had 259).
  readme = (ROOT / 'README.md').read_text()
  assert not re.search(r'\d+ passed', readme)
  assert 'about 5 minutes' in readme
