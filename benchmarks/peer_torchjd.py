"""What a PyTorch user would run instead: a plain step and TorchJD's MGDA.

Times, on the model shape of ``_gpt.py`` (d_model 768, 12 layers, 12 heads,
sequence 256, batch 32, vocabulary 8192; pre-LayerNorm GPT with fused causal
attention ``F.scaled_dot_product_attention``, bf16 autocast, fp32 params,
fused AdamW):

* ``torch mean``: the ordinary PyTorch step (eager);
* ``torchjd autojac MGDA m``: ``torchjd.autojac.backward`` of the m group
  losses, then ``jac_to_grad(params, MGDA())`` (the full m x P Jacobian);
* ``torchjd autogram MGDA m``: ``torchjd.autogram.Engine(model,
  batch_dim=0)`` on inputs shaped ``[m, B/m, T]`` (the groups are the batch
  dimension the engine sees), ``MGDAWeighting()`` on the Gramian, then
  ``losses.backward(weights)``. If it fails under bf16 autocast it is rerun
  in float32 and marked so (its ratio is then against a float32 mean step).

The output head is untied here (TorchJD's autogram hooks modules and would
miss a weight used outside its module), so the PyTorch model has 98.0 M
parameters against 91.5 M for the tied JAX model; the head matmul costs the
same in both. Time per step: median over ``--reps`` of ``--inner`` steps
(CUDA-synchronised); peak memory from ``torch.cuda.max_memory_allocated``.

Usage: python benchmarks/peer_torchjd.py --config full [--groups 4 8]
           [--json out.jsonl]
Needs torch (and torchjd for the TorchJD rows; they are skipped without it).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', choices=['tiny', 'full'], default='tiny')
  p.add_argument('--groups', type=int, nargs='+', default=[4, 8])
  p.add_argument('--inner', type=int, default=None)
  p.add_argument('--reps', type=int, default=None)
  p.add_argument('--json', default=None)
  return p.parse_args(argv)


# Same shapes as _gpt.FULL / _gpt.TINY (not imported: that would load JAX).
SHAPES = {
    'full': dict(vocab=8192, seq=256, d_model=768, layers=12, heads=12,
                 batch=32),
    'tiny': dict(vocab=128, seq=16, d_model=32, layers=2, heads=2, batch=16),
}


def build_model(torch, shape, device):
  nn = torch.nn
  f = torch.nn.functional

  class PosAdd(nn.Module):
    def __init__(self, seq, d):
      super().__init__()
      self.weight = nn.Parameter(0.01 * torch.randn(seq, d))

    def forward(self, x):
      return x + self.weight[: x.shape[-2]].to(x.dtype)

  class Block(nn.Module):
    def __init__(self, d, heads):
      super().__init__()
      self.heads = heads
      self.ln1 = nn.LayerNorm(d)
      self.qkv = nn.Linear(d, 3 * d)
      self.proj = nn.Linear(d, d)
      self.ln2 = nn.LayerNorm(d)
      self.fc = nn.Linear(d, 4 * d)
      self.out = nn.Linear(4 * d, d)

    def forward(self, x):
      lead, (t, d) = x.shape[:-2], x.shape[-2:]
      qkv = self.qkv(self.ln1(x)).reshape(-1, t, 3, self.heads, d // self.heads)
      q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
      att = f.scaled_dot_product_attention(q, k, v, is_causal=True)
      att = att.transpose(1, 2).reshape(*lead, t, d)
      x = x + self.proj(att)
      return x + self.out(f.gelu(self.fc(self.ln2(x)), approximate='tanh'))

  class GPT(nn.Module):
    def __init__(self, s):
      super().__init__()
      self.wte = nn.Embedding(s['vocab'], s['d_model'])
      self.wpe = PosAdd(s['seq'], s['d_model'])
      self.blocks = nn.ModuleList(
          [Block(s['d_model'], s['heads']) for _ in range(s['layers'])])
      self.ln_f = nn.LayerNorm(s['d_model'])
      self.head = nn.Linear(s['d_model'], s['vocab'], bias=False)

    def forward(self, tokens):
      x = self.wpe(self.wte(tokens))
      for block in self.blocks:
        x = block(x)
      return self.head(self.ln_f(x))

  return GPT(shape).to(device)


def main(argv=None):
  args = _parse(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('peer_torchjd.py needs PyTorch (pip install torch); torchjd is '
             'optional (its rows are skipped without it).')
  try:
    import torchjd  # pylint: disable=g-import-not-at-top
    from torchjd.aggregation import MGDA, MGDAWeighting  # pylint: disable=g-import-not-at-top
    from torchjd.autogram import Engine  # pylint: disable=g-import-not-at-top
    from torchjd.autojac import backward as jd_backward  # pylint: disable=g-import-not-at-top
    from torchjd.autojac import jac_to_grad  # pylint: disable=g-import-not-at-top
    import importlib.metadata  # pylint: disable=g-import-not-at-top
    tjd_version = importlib.metadata.version('torchjd')
  except ImportError:
    torchjd = None
    tjd_version = None
  full = args.config == 'full'
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  inner = args.inner or (5 if full else 2)
  reps = args.reps or (5 if full else 2)
  shape = SHAPES[args.config]
  torch.manual_seed(0)
  env = {'torch': torch.__version__, 'torchjd': tjd_version,
         'device': torch.cuda.get_device_name() if cuda else 'cpu',
         'date': time.strftime('%Y-%m-%d'), 'config': args.config}
  print(json.dumps({'benchmark': 'peer_torchjd', 'env': env}))
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
  b, t, v = shape['batch'], shape['seq'], shape['vocab']
  tokens = torch.randint(0, v, (b, t + 1), device=device)
  x, y = tokens[:, :-1], tokens[:, 1:]

  def sync():
    if cuda:
      torch.cuda.synchronize()

  def run(name, make_step, m, dtype_name):
    step = None
    try:
      step = make_step()
      for _ in range(2):
        step()
      sync()
      if cuda:
        torch.cuda.reset_peak_memory_stats()
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
          step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
      rec = {'benchmark': 'peer_torchjd', 'config': args.config, 'step': name,
             'm': m, 'dtype': dtype_name, 'ms': statistics.median(times),
             'ms_min': min(times), 'ms_max': max(times),
             'peak_bytes': torch.cuda.max_memory_allocated() if cuda else None,
             'params': sum(p.numel() for p in step.model.parameters()), **env}
    except Exception as e:  # pylint: disable=broad-except
      rec = {'benchmark': 'peer_torchjd', 'config': args.config, 'step': name,
             'm': m, 'dtype': dtype_name, 'error': f'{type(e).__name__}: {e}'[:300],
             **env}
    del step
    if cuda:
      torch.cuda.empty_cache()
    line = json.dumps(rec)
    print(line, flush=True)
    if args.json:
      with open(args.json, 'a') as fh:
        fh.write(line + '\n')
    return rec

  ce = torch.nn.functional.cross_entropy

  def make(kind, m=1, bf16=True):
    torch.manual_seed(0)
    model = build_model(torch, shape, device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95),
                            weight_decay=0.1, fused=cuda)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else (
        lambda: torch.autocast(device, enabled=False))
    engine = Engine(model, batch_dim=0) if kind == 'autogram' else None
    xg, yg = x.reshape(m, b // m, t), y.reshape(m, b // m, t)

    def group_losses():
      logits = model(xg)
      tok = ce(logits.float().reshape(-1, v), yg.reshape(-1), reduction='none')
      return tok.reshape(m, -1).mean(dim=1)

    def step():
      if kind == 'mean':
        with ctx():
          logits = model(x)
        loss = ce(logits.float().reshape(-1, v), y.reshape(-1))
        loss.backward()
      elif kind == 'autojac':
        with ctx():
          losses = group_losses()
        jd_backward(losses)
        jac_to_grad(model.parameters(), MGDA())
      else:
        with ctx():
          losses = group_losses()
        gramian = engine.compute_gramian(losses)
        weights = MGDAWeighting()(gramian)
        losses.backward(weights)
      opt.step()
      opt.zero_grad(set_to_none=True)

    step.model, step.opt = model, opt
    return step

  rows = [run('torch mean', lambda: make('mean'), 1, 'bf16')]
  if torchjd is not None:
    fp32_mean = None
    for m in args.groups:
      rows.append(run('torchjd autojac MGDA', lambda: make('autojac', m), m,
                      'bf16'))
      rec = run('torchjd autogram MGDA', lambda: make('autogram', m), m, 'bf16')
      rows.append(rec)
      if 'error' in rec:
        if fp32_mean is None:
          fp32_mean = run('torch mean', lambda: make('mean', bf16=False), 1,
                          'fp32')
          rows.append(fp32_mean)
        rows.append(run('torchjd autogram MGDA',
                        lambda: make('autogram', m, False), m, 'fp32'))
  base = {r['dtype']: r['ms'] for r in rows
          if r['step'] == 'torch mean' and 'ms' in r}
  table = []
  for r in rows:
    ok = 'ms' in r
    table.append({
        'step': r['step'] + (f" m={r['m']}" if r['m'] > 1 else ''),
        'dtype': r['dtype'],
        'ms': r['ms'] if ok else float('nan'),
        'vs torch mean': r['ms'] / base[r['dtype']] if ok and r['dtype'] in base
                         else float('nan'),
        'peak GB': (r.get('peak_bytes') or float('nan')) / 1e9,
        'note': '' if ok else r['error'][:80]})
  print(f'\nPyTorch peers, {env["device"]}, torch {env["torch"]}, torchjd '
        f'{env["torchjd"]}, {args.config} config')
  print('| step | dtype | ms | vs torch mean | peak GB | note |')
  print('|---|---|---|---|---|---|')
  for r in table:
    print(f"| {r['step']} | {r['dtype']} | {r['ms']:.2f} | "
          f"{r['vs torch mean']:.2f} | {r['peak GB']:.2f} | {r['note']} |")
  return rows


if __name__ == '__main__':
  main()
