"""
A research harness for the question "what makes TAPA learn in a small model?".

It trains the tiny byte-level model of configs/tiny_base.py (4 layers, n_embd 128, 4 heads of 32
dims, context 128, batch 16) on PG-19 mini for a fixed number of steps, then reports the validation
loss at the training length and zero-shot at 2x, 4x and 8x it. One run per command; each appends a
line of JSON to --results (default runs/tapa_probe/results.jsonl), and `--table` prints them all.

    python data/pg19/prepare.py --tokenizer byte --source ../shared/data/pg19_mini   # once
    python experiments/tapa_probe.py --name=rope --pe=rope --lr=2e-3
    python experiments/tapa_probe.py --name=tapa --pe=tapa --lr=1e-3
    python experiments/tapa_probe.py --name=tapa_ps0.05 --lr=2e-3 --phase_scale=0.05
    python experiments/tapa_probe.py --table

Why a loop of its own rather than train.py: besides the settings that model.py and train.py have
(alpha, theta, tapa_phase_scale, tapa_phase_warmup_iters), it tries variants that are NOT in
model.py, as its own entry in model.py's PE_TABLE (an attention function with per-layer parameters):
  --qk_norm=amp|phase|both   RMS-normalize the amplitude and/or phase parts of q and k, with a
                             learnable per-head gain (QK-norm)
  --phase_lr_mult=m          a separate learning rate for the phase rows of the q/k projection
                             (applied as m x the AdamW update of those rows)
  --phase_bias=b             a learnable per-head offset added to phi, initialized to b/H .. b
Those that helped made it into model.py as options; the others are documented in
docs/small_scale_study.md with their numbers. The evaluation here is quick: non-overlapping windows
at random offsets of the validation books (the same windows for every run), mean loss over all
positions. eval_ppl.py is the careful sliding-window protocol.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model as M  # noqa: E402
from configurator import HELP_FLAGS, print_help  # noqa: E402
from data.common import load_split, read_meta  # noqa: E402

settings = dict(name='run', pe='tapa', n_head=4, alpha=0.1, theta=0.5, phase='quadratic', lr=1e-3, iters=1000,
                warmup=100, batch_size=16, block_size=128, weight_decay=0.1, seed=1337, bias=False,
                phase_scale=1.0, phase_warmup=0, qk_norm='none', qk_gain_init=4.0, phase_gain_init=0.5,
                phase_lr_mult=1.0, phase_bias=0.0, eval_lengths='128,256,512,1024', eval_tokens=16384,
                data_dir=os.path.join(REPO, 'data', 'pg19', 'byte'),
                results=os.path.join(REPO, 'runs', 'tapa_probe', 'results.jsonl'), threads=1)


def eval_lengths(s):
    return [int(x) for x in s['eval_lengths'].split(',') if x.strip()]


def parse(argv):
    if any(arg in HELP_FLAGS for arg in argv):  # usage and settings, as every script here prints them
        print_help(__doc__, settings)
        print('  --table  (print the table of every run in --results, train nothing)')
        sys.exit(0)
    for arg in argv:
        if arg == '--table':
            continue
        key, _, value = arg.lstrip('-').partition('=')
        if key not in settings:
            sys.exit(f"unknown setting {key!r}; known: {', '.join(settings)}, and --table")
        default = settings[key]
        if isinstance(default, bool):
            if value.lower() not in ('1', 'true', '0', 'false'):
                sys.exit(f"--{key}={value}: expected True or False")
            settings[key] = value.lower() in ('1', 'true')
            continue
        try:
            settings[key] = type(default)(value)
        except ValueError:
            sys.exit(f"--{key}={value}: expected a {type(default).__name__} (the default is {default!r})")
    choices = {'pe': tuple(M.PE_TABLE), 'phase': ('quadratic', 'linear'), 'qk_norm': ('none', 'amp', 'phase', 'both')}
    for key, allowed in choices.items():
        if settings[key] not in allowed:
            sys.exit(f"--{key}={settings[key]}: expected one of {', '.join(allowed)}")
    try:
        lengths = eval_lengths(settings)
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        sys.exit(f"--eval_lengths={settings['eval_lengths']}: expected comma-separated positive integers")
    return settings


def print_table(path):
    # before the first run there is no file: say what to run, not a traceback
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    if not rows:
        sys.exit(f"no runs in {path} yet: train one first, e.g. python experiments/tapa_probe.py "
                 f"--name=rope --pe=rope --lr=2e-3")
    lengths = sorted({L for r in rows for L in r['val_loss']}, key=int)  # runs may differ in eval_lengths
    print('| run | settings | ' + ' | '.join(f'val loss @{L}' for L in lengths) + ' | ppl ratio longest/shortest |')
    print('|---|---|' + '---|' * (len(lengths) + 1))
    for r in rows:
        s = r['settings']
        changed = ' '.join(f'{k}={v}' for k, v in s.items() if k not in ('name', 'results', 'data_dir', 'threads', 'eval_lengths', 'eval_tokens')
                           and v != DEFAULTS[k])
        v = r['val_loss']
        own = sorted(v, key=int)  # this run's own shortest and longest lengths
        ratio = math.exp(v[own[-1]] - v[own[0]]) if len(own) > 1 else float('nan')
        print(f"| {s['name']} | {changed} | " + ' | '.join(f'{v[L]:.3f}' if L in v else 'n/a' for L in lengths)
              + f' | {ratio:.2f} |')


def rms_norm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ProbeParams(M.TAPAPhaseScale):
    """TAPA's phase scale plus the experimental variants' learned gains, one module per layer."""

    def __init__(self, cfg, s):
        super().__init__(cfg)
        H = cfg.n_head
        self.amp_gain = nn.Parameter(torch.full((H, 1, 1), s['qk_gain_init']))
        self.phase_gain = nn.Parameter(torch.full((H, 1, 1), s['phase_gain_init']))
        self.phase_bias = nn.Parameter(torch.linspace(s['phase_bias'] / H, s['phase_bias'], H).view(H, 1, 1))


def variant_attend(s, d_amp, d_phase):
    """TAPA's attention (Eq. 12, the naive path) with the experimental variants switched in: a
    PE_TABLE attention function, params being the layer's ProbeParams."""
    def attend(q, k, v, pos, params, cfg):
        Tq, Tk = q.size(2), k.size(2)
        q_amp, q_phase, k_amp, k_phase = q[..., :d_amp], q[..., d_amp:], k[..., :d_amp], k[..., d_amp:]
        if s['qk_norm'] in ('amp', 'both'):
            q_amp, k_amp = rms_norm(q_amp), rms_norm(k_amp)
        if s['qk_norm'] in ('phase', 'both'):
            q_phase, k_phase = rms_norm(q_phase), rms_norm(k_phase)
        amplitude = q_amp @ k_amp.transpose(-1, -2) / math.sqrt(d_amp)
        if s['qk_norm'] in ('amp', 'both'):
            amplitude = amplitude * params.amp_gain
        if s['phase'] == 'quadratic':
            phi = q_phase @ k_phase.transpose(-1, -2) / math.sqrt(d_phase)
        else:
            phi = (q_phase.sum(-1)[..., :, None] + k_phase.sum(-1)[..., None, :]) / math.sqrt(d_phase)
        phi = phi * params.dim_scale[-1]  # tapa_phase_scale x the warm-up ramp, as model.py applies it
        if s['qk_norm'] in ('phase', 'both'):
            phi = phi * params.phase_gain
        if s['phase_bias']:
            phi = phi + params.phase_bias
        weight = M.tapa_distance_weight(Tk - Tq, Tq, 0, Tk, s['alpha'], q.device)
        scores = amplitude * torch.cos(2 * math.pi * weight * phi)
        scores = scores.masked_fill(~M.causal_mask(Tq, Tk, q.device), float('-inf'))
        return F.softmax(scores, -1) @ v
    return attend


def build(s):
    vocab_size = read_meta(s['data_dir'])['vocab_size']  # 256 for bytes, 50257 for GPT-2 BPE
    cfg = M.GPTConfig(n_layer=4, n_head=s['n_head'], n_embd=128, block_size=s['block_size'], vocab_size=vocab_size, bias=s['bias'],
                      pos_encoding=s['pe'], tapa_alpha=s['alpha'], tapa_theta=s['theta'], tapa_phase=s['phase'],
                      tapa_phase_scale=s['phase_scale'], attn_impl='naive')
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    d_amp, d_phase = M.tapa_split(D, s['theta']) if s['pe'] == 'tapa' else (0, 0)
    if s['pe'] == 'tapa' and (s['qk_norm'] != 'none' or s['phase_bias']):
        # the variants as this process's TAPA entry of model.py's table: per-layer parameters of their own
        M.PE_TABLE['tapa'] = M.PositionalEncoding(variant_attend(s, d_amp, d_phase), shared=False,
                                                  params=lambda cfg: ProbeParams(cfg, s), check=M.check_tapa)
    model = M.GPT(cfg)
    # the phase rows of c_attn (q's and k's), for --phase_lr_mult
    phase_rows = torch.tensor([part * cfg.n_embd + h * D + d for part in (0, 1) for h in range(H)
                               for d in range(d_amp, D)], dtype=torch.long)
    return model, phase_rows


def main():
    s = parse(sys.argv[1:])
    if '--table' in sys.argv[1:]:
        return print_table(s['results'])
    torch.set_num_threads(s['threads'])
    torch.manual_seed(s['seed'])
    try:  # missing or damaged data: the message names the prepare command
        train_tokens, _ = load_split(s['data_dir'], 'train')
        val_tokens, _ = load_split(s['data_dir'], 'validation')
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    longest = max(eval_lengths(s))
    if longest + 1 >= len(val_tokens):  # found now, not after the training
        sys.exit(f"--eval_lengths: {longest} tokens do not fit in the validation split of {s['data_dir']} "
                 f"({len(val_tokens)} tokens)")
    model, phase_rows = build(s)
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith(('gain', 'bias'))]
    others = [p for n, p in model.named_parameters() if p.dim() < 2 or n.endswith(('gain', 'bias'))]
    optimizer = torch.optim.AdamW([{'params': matrices, 'weight_decay': s['weight_decay']},
                                   {'params': others, 'weight_decay': 0.0}], lr=s['lr'], betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(s['seed'])
    T, B = s['block_size'], s['batch_size']

    def batch(tokens, starts, length):
        x = torch.from_numpy(np.stack([tokens[i:i + length] for i in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + length] for i in starts]).astype(np.int64))
        return x, y

    def lr_at(it):  # linear warmup, cosine to lr/10
        if it < s['warmup']:
            return s['lr'] * (it + 1) / s['warmup']
        progress = (it - s['warmup']) / max(1, s['iters'] - s['warmup'])
        return s['lr'] * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    t0, losses = time.time(), []
    for it in range(s['iters']):
        for group in optimizer.param_groups:
            group['lr'] = lr_at(it)
        if s['phase_warmup']:
            model.set_tapa_phase_ramp(min(1.0, (it + 1) / s['phase_warmup']))
        x, y = batch(train_tokens, torch.randint(len(train_tokens) - T - 1, (B,), generator=batches).numpy(), T)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if s['phase_lr_mult'] != 1.0:
            before = [b.attn.c_attn.weight.detach()[phase_rows].clone() for b in model.transformer.h]
        optimizer.step()
        if s['phase_lr_mult'] != 1.0:  # scale the update of the phase rows
            with torch.no_grad():
                for block, old in zip(model.transformer.h, before):
                    W = block.attn.c_attn.weight
                    W[phase_rows] = old + s['phase_lr_mult'] * (W[phase_rows] - old)
        losses.append(loss.item())
        if (it + 1) % 100 == 0:
            print(f"{s['name']} iter {it + 1}: train loss {np.mean(losses[-100:]):.3f} ({time.time() - t0:.0f}s)", flush=True)

    model.eval()
    model.set_tapa_phase_ramp(1.0)
    val_loss = {}
    windows = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for L in eval_lengths(s):
            starts = torch.randint(len(val_tokens) - L - 1, (max(1, s['eval_tokens'] // L),), generator=windows).numpy()
            total = 0.0
            for start in starts:
                x, y = batch(val_tokens, [start], L)
                total += model(x, y)[1].item()
            val_loss[L] = round(total / len(starts), 4)
    record = dict(settings=s, train_loss_last100=round(float(np.mean(losses[-100:])), 4), val_loss=val_loss,
                  seconds=round(time.time() - t0, 1))
    print(json.dumps(record), flush=True)
    os.makedirs(os.path.dirname(s['results']), exist_ok=True)
    with open(s['results'], 'a') as f:
        f.write(json.dumps(record) + '\n')


DEFAULTS = dict(settings)
if __name__ == '__main__':
    main()
