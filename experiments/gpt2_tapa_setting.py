"""
Which TAPA setting configs/pg19_gpt2_tapa.py should ship, checked on a CPU before anyone spends a day
of GPU time on it. The 124M config is shrunk to what a CPU trains in minutes, keeping what the
question turns on: GPT-2's BPE (a 50k-way softmax) and GPT-2's head dim of 64, so the phase part of
each head (32 dims) is as wide as at 124M, not the 16 dims of the byte-level tiny models.

    python experiments/gpt2_tapa_setting.py --jobs=2 --threads=1     # 4 settings x 2 seeds (docs/small_scale_study.md: time)
    python experiments/gpt2_tapa_setting.py --settings=paper,small_linear --seeds=3
    python experiments/gpt2_tapa_setting.py --quick                  # a smoke test, < 1 minute

The settings (each a configs/pg19_gpt2_<pe>.py with a few --key=value, listed in SETTINGS below):
  paper          the paper's TAPA (phase scale 1, quadratic phase) at the paper's learning rate ratio
                 (TAPA's 5x below RoPE's): lr 1.2e-4, what configs/pg19_gpt2_tapa.py had before this check
  paper_fast_lr  the same model at RoPE's lr 6e-4 (separates the phase from the learning rate): the config
                 as it is now, set from this comparison (docs/small_scale_study.md)
  small          the small-model setting: phase scale 0.05 at lr 6e-4 (the config's fallback comment)
  small_linear   the small-model setting with the linear phase (the tiny models' best TAPA)
  rope           configs/pg19_gpt2_rope.py (lr 6e-4)

Every run: 4 layers, n_embd 256, 4 heads (head dim 64), context 256, 4 x 256 tokens per step, `iters`
steps (warmup 5% of them, cosine decay to the end, as in pg19_gpt2_base.py), validation loss every
`iters`/3 steps on the same fixed batches. To read where a loss stands, the table adds two count models
of the validation split built from the training split: a unigram and a bigram (Dirichlet-smoothed
towards the unigram, its one parameter the best of a few on the validation split itself, so it is a
generous bigram). A model "stalled near the bigram level" has learned word pairs and nothing more.

What this can show is narrow: which setting learns at all, and how fast, in the first few hundred
steps of a GPT-2-BPE model with GPT-2's head dim; not what each reaches at 124M parameters after 2.6B
tokens. Data: data/pg19/gpt2 (python data/pg19/prepare.py --tokenizer gpt2 --num_books 50 --splits
train validation), or --data_dir. Output in --out (default runs/gpt2_tapa_setting; with --quick,
runs/gpt2_tapa_setting-quick): results.md, results.json, results.csv, each run's checkpoint and
log.jsonl in ckpt/<setting>-s<seed>/, each command's output in logs/. A run that already finished in
--out with the same settings is not run again.
"""

import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configurator import ConfigError  # noqa: E402
from paper_in_miniature import (FIRST_SEED, StepFailed, finished_training, run_steps, script_settings,  # noqa: E402
                                val_losses, write_results)

# -----------------------------------------------------------------------------
# settings (python experiments/gpt2_tapa_setting.py --key=value; --quick alone means --quick=True)
out = 'runs/gpt2_tapa_setting'
quick = False
settings = 'paper,paper_fast_lr,small,rope'  # names from SETTINGS
seeds = 2                      # runs of each setting, train.py --seed = 1337, 1338, ...
iters = 300                    # steps of each run
eval_iters = 40                # validation batches per estimate (fixed batches, the same for every run)
data_dir = ''                  # '' = data/pg19/gpt2
jobs = 1                       # runs at the same time
threads = 0                    # torch threads per run (0 = torch's default)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and k not in ('REPO',) and isinstance(v, (bool, int, float, str))}
QUICK = dict(out='runs/gpt2_tapa_setting-quick', settings='paper,rope', seeds=1, iters=3, eval_iters=1)

# name -> (config file, its overrides, what it is)
SETTINGS = {
    'paper': ('configs/pg19_gpt2_tapa.py', ['--learning_rate=1.2e-4', '--min_lr=1.2e-5'],
              "the paper's TAPA: phase scale 1, quadratic phase, lr 1.2e-4 (RoPE's / 5)"),
    'paper_fast_lr': ('configs/pg19_gpt2_tapa.py', ['--learning_rate=6e-4', '--min_lr=6e-5'],
                      "the paper's TAPA at RoPE's lr 6e-4 (the config as it is)"),
    'small': ('configs/pg19_gpt2_tapa.py', ['--tapa_phase_scale=0.05', '--learning_rate=6e-4', '--min_lr=6e-5'],
              'small-model setting: phase scale 0.05, lr 6e-4'),
    'small_linear': ('configs/pg19_gpt2_tapa.py', ['--tapa_phase_scale=0.05', '--tapa_phase=linear',
                                                    '--learning_rate=6e-4', '--min_lr=6e-5'],
                     'small-model setting, linear phase, lr 6e-4'),
    'rope': ('configs/pg19_gpt2_rope.py', [], 'RoPE, lr 6e-4'),
}
# GPT-2 small shrunk for a CPU, head dim kept at 64 (n_embd / n_head); with --quick, smaller still
SHRINK = ['--n_layer=4', '--n_embd=256', '--n_head=4', '--block_size=256', '--batch_size=4',
          '--gradient_accumulation_steps=1']
SHRINK_QUICK = ['--n_layer=1', '--n_embd=64', '--n_head=1', '--block_size=32', '--batch_size=2',
                '--gradient_accumulation_steps=1']


def count_model_losses(folder, betas=(1, 10, 100, 1000)):
    """Cross-entropy (nats per token) on the validation split of two count models of the training split:
    a unigram (add-one) and a bigram Dirichlet-smoothed towards it,
    p(b | a) = (c(a, b) + beta * p(b)) / (c(a) + beta), with the best beta of `betas`."""
    import numpy as np
    with open(os.path.join(folder, 'meta.json')) as f:
        V = json.load(f)['vocab_size']
    train = np.fromfile(os.path.join(folder, 'train.bin'), dtype=np.uint16).astype(np.int64)
    val = np.fromfile(os.path.join(folder, 'validation.bin'), dtype=np.uint16).astype(np.int64)
    uni = (np.bincount(train, minlength=V) + 1.0) / (len(train) + V)
    unigram = float(-np.log(uni[val]).mean())
    keys, counts = np.unique(train[:-1] * V + train[1:], return_counts=True)  # every pair seen, sorted
    pairs = val[:-1] * V + val[1:]
    at = np.minimum(np.searchsorted(keys, pairs), len(keys) - 1)
    c_ab = np.where(keys[at] == pairs, counts[at], 0).astype(np.float64)
    c_a = np.bincount(train[:-1], minlength=V)[val[:-1]].astype(np.float64)
    p_b = uni[val[1:]]
    bigram = {b: float(-np.log((c_ab + b * p_b) / (c_a + b)).mean()) for b in betas}
    best = min(bigram, key=bigram.get)
    return dict(unigram=unigram, bigram=bigram[best], bigram_beta=best, validation_tokens=int(len(val)))


def val_curve(out_dir):
    """{iter: validation loss} of a run (its log.jsonl), or {} when it has none."""
    try:
        return val_losses(out_dir)
    except (OSError, ValueError):
        return {}


def main(argv):
    argv, cfg = script_settings(argv, DEFAULTS, QUICK, __doc__, 'comparison')
    names = [s.strip() for s in cfg['settings'].split(',') if s.strip()]
    for name in names:
        if name not in SETTINGS:
            raise ConfigError(f"--settings: unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    if cfg['seeds'] < 1:
        raise ConfigError(f"--seeds={cfg['seeds']}: at least 1")
    if cfg['iters'] < 3:
        raise ConfigError(f"--iters={cfg['iters']}: at least 3 steps")
    folder = os.path.abspath(cfg['data_dir']) if cfg['data_dir'] else os.path.join(REPO, 'data', 'pg19', 'gpt2')
    if not os.path.exists(os.path.join(folder, 'meta.json')):
        raise ConfigError(f"no prepared data in {folder}: python data/pg19/prepare.py --tokenizer gpt2 "
                          f"--num_books 50 --splits train validation (or --data_dir)")
    cfg['out'] = out_dir = os.path.abspath(cfg['out'])
    os.makedirs(os.path.join(out_dir, 'logs'), exist_ok=True)
    n, seeds = cfg['iters'], [FIRST_SEED + i for i in range(cfg['seeds'])]
    every = max(1, n // 3)
    schedule = [f'--max_iters={n}', f'--lr_decay_iters={n}', f'--warmup_iters={max(1, n // 20)}',
                f'--eval_interval={every}', f'--eval_iters={cfg["eval_iters"]}', '--log_interval=10']
    t0, times, steps = time.time(), {}, []
    old_cwd = os.getcwd()
    os.chdir(REPO)  # (the commands' config files are relative to it)
    try:
        for sd in seeds:
            for name in names:
                config, extra, _ = SETTINGS[name]
                command = (['python', 'train.py', config, f'--out_dir={os.path.join(out_dir, "ckpt", f"{name}-s{sd}")}',
                            f'--seed={sd}', f'--data_dir={folder}'] + (SHRINK_QUICK if cfg['quick'] else SHRINK)
                           + schedule + extra)
                if finished_training(command):
                    print(f"  {name}-s{sd}: finished before, not rerun")
                else:
                    steps.append((f'{name}-s{sd}', command))
        with open(os.path.join(out_dir, 'commands.sh'), 'a') as f:
            f.write(f"# python experiments/gpt2_tapa_setting.py {' '.join(argv)}\n")
        run_steps(steps, cfg, times)
    finally:
        os.chdir(old_cwd)

    # the table: validation loss at each evaluation, mean (min-max) over the seeds
    refs = count_model_losses(folder)
    curves = {name: [val_curve(os.path.join(out_dir, 'ckpt', f'{name}-s{sd}')) for sd in seeds] for name in names}
    at = sorted({i for runs in curves.values() for c in runs for i in c if i > 0})

    def stat(name, i):
        xs = [c[i] for c in curves[name] if i in c]
        if len(xs) < len(seeds):
            return None
        return dict(mean=sum(xs) / len(xs), min=min(xs), max=max(xs), per_seed=xs)

    def show(s):
        if s is None:
            return 'n/a'
        return f"{s['mean']:.3f}" + (f" ({s['min']:.3f}-{s['max']:.3f})" if len(seeds) > 1 else '')
    table = {name: {i: stat(name, i) for i in at} for name in names}
    lines = ['| setting | what | ' + ' | '.join(f'step {i}' for i in at) + ' |', '|---|---|' + '---:|' * len(at)]
    lines += [f"| {name} | {SETTINGS[name][2]} | " + ' | '.join(show(table[name][i]) for i in at) + ' |'
              for name in names]
    from runtime import machine  # (imports torch: not at start-up)
    hw, wall = machine(cfg['threads']), time.time() - t0
    size = dict(a[2:].split('=', 1) for a in (SHRINK_QUICK if cfg['quick'] else SHRINK))  # {'n_layer': '4', ...}
    md = ['# TAPA settings for the GPT-2-BPE config, checked on a CPU', '',
          f"`python experiments/gpt2_tapa_setting.py {' '.join(argv)}`".replace(' `', '`'), '',
          f"Validation loss (nats per token, GPT-2 BPE, {cfg['eval_iters']} fixed batches) of "
          f"a GPT of n_layer {size['n_layer']}, n_embd {size['n_embd']}, n_head {size['n_head']} "
          f"(head dim {int(size['n_embd']) // int(size['n_head'])}), context {size['block_size']}, trained {n} steps of "
          f"{size['batch_size']} x {size['block_size']} tokens; "
          + (f"the mean over seeds {', '.join(map(str, seeds))} (min-max)." if len(seeds) > 1 else f"seed {seeds[0]}."),
          '', *lines, '',
          f"For scale, count models of the validation split ({refs['validation_tokens']:,} tokens) from the "
          f"training split: unigram {refs['unigram']:.3f}, bigram {refs['bigram']:.3f} (Dirichlet "
          f"beta {refs['bigram_beta']}, the best of 1, 10, 100, 1000 on the validation split itself). "
          f"log(50257) = {math.log(50257):.3f} is a uniform guess.", '',
          f"Wall time of this invocation {wall / 60:.1f} min ({len(steps)} runs) on {hw['cpu']}, "
          f"{hw['logical_cpus']} logical CPUs, {cfg['jobs']} run(s) at a time, {hw['torch_threads']} thread(s) each.", '']
    summary = dict(settings={k: cfg[k] for k in DEFAULTS}, hardware=hw, wall_seconds=round(wall, 1), run_seconds=times,
                   seeds=seeds, reference=refs, commands={name: SETTINGS[name][:2] for name in names},
                   val_loss={name: {str(i): table[name][i] for i in at} for name in names})
    write_results(out_dir, md, summary, ['setting', 'seed', 'iter', 'val_loss'],
                  [[name, sd, i, c[i]] for name in names for sd, c in zip(seeds, curves[name]) for i in sorted(c)])
    print('\n'.join(md))
    print(f"wrote {out_dir}/results.md, results.json, results.csv")
    return summary


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, StepFailed) as e:
        sys.exit(f"error: {e}")
