"""
A small learning-rate sweep for the tiny configs, so that every encoding is compared at its own best
peak learning rate rather than at whatever value its config happened to get:

    python experiments/lr_sweep.py --jobs=2 --threads=1                  # every tiny config, 3 rates
    python experiments/lr_sweep.py --encodings=rope,alibi --lrs=5e-4,1e-3,2e-3
    python experiments/lr_sweep.py --quick                               # a smoke test, < 1 minute

Each run is configs/tiny_<pe>.py with --learning_rate=lr and --min_lr=lr/10 (the configs' ratio),
trained for the miniature's pretraining budget (1,000 steps, the schedule compressed to fit, as
experiments/paper_in_miniature.py does), then scored by its validation loss at the end: eval_iters=100
batches of 16 x 128 bytes, the same fixed batches for every run (train.py draws evaluation batches
from a fixed seed). The sweep tunes on the validation split; the miniature reports on the test split,
so the tuning does not select on the text it is judged on.

A run that has already finished in --out with the settings its command gives (its checkpoint at the
last step, every setting the same: paper_in_miniature.finished_training) is not rerun, so encodings can be added to a sweep later and the table covers all of them. Output in --out
(default runs/lr_sweep; with --quick, runs/lr_sweep-quick): results.md (validation loss per encoding
and rate, the best in bold; a best at the edge of the grid says the grid should be widened), results.json,
results.csv, each run's checkpoint and log.jsonl in ckpt/<pe>-lr<lr>/, each command's output in logs/.
"""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configurator import ConfigError  # noqa: E402
from paper_in_miniature import (StepFailed, finished_training, last_val_loss, run_steps, script_settings,  # noqa: E402
                                write_results)

# -----------------------------------------------------------------------------
# settings (python experiments/lr_sweep.py --key=value; --quick alone means --quick=True)
out = 'runs/lr_sweep'
quick = False
encodings = 'tapa_small_linear,rope,alibi,nope,learned,sinusoidal,t5,kerple,xpos,fire,cope'  # configs/tiny_<pe>.py
lrs = '1e-3,2e-3,4e-3'         # peak learning rates; min_lr = lr / 10
iters = 1000                   # steps of each run (the miniature's pretraining)
eval_iters = 100               # validation batches of the final score (fixed batches, the same for every run)
seed = 1337
data_dir = ''                  # '' = data/pg19/byte
jobs = 1                       # runs at the same time
threads = 0                    # torch threads per run (0 = torch's default)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and k not in ('REPO',) and isinstance(v, (bool, int, float, str))}
QUICK = dict(out='runs/lr_sweep-quick', encodings='rope,alibi', lrs='1e-3,2e-3', iters=4, eval_iters=1)


def run_name(pe, lr):
    return f'{pe}-lr{lr:g}'


def final_val_loss(out_dir, iters):
    """The validation loss of a run at its last step, iters, else None."""
    try:
        last = last_val_loss(out_dir)
    except (OSError, ValueError):
        return None
    return last[1] if last is not None and last[0] == iters else None


def main(argv):
    argv, cfg = script_settings(argv, DEFAULTS, QUICK, __doc__, 'sweep')
    pes = [p.strip() for p in cfg['encodings'].split(',') if p.strip()]
    for pe in pes:
        if not os.path.exists(os.path.join(REPO, 'configs', f'tiny_{pe}.py')):
            raise ConfigError(f"--encodings: there is no configs/tiny_{pe}.py")
    try:
        rates = sorted(float(x) for x in cfg['lrs'].split(',') if x.strip())
    except ValueError:
        raise ConfigError(f"--lrs={cfg['lrs']}: expected comma-separated numbers, e.g. 1e-3,2e-3,4e-3") from None
    if not rates or min(rates) <= 0:
        raise ConfigError(f"--lrs={cfg['lrs']}: expected positive learning rates")
    if cfg['iters'] < 2:
        raise ConfigError(f"--iters={cfg['iters']}: at least 2 steps")
    cfg['out'] = out_dir = os.path.abspath(cfg['out'])
    os.makedirs(os.path.join(out_dir, 'logs'), exist_ok=True)
    data = []
    if cfg['data_dir']:
        data = [f"--data_dir={os.path.abspath(cfg['data_dir'])}"]
    elif not os.path.exists(os.path.join(REPO, 'data', 'pg19', 'byte', 'meta.json')):
        raise ConfigError("no prepared data in data/pg19/byte: python data/pg19/prepare.py --tokenizer byte "
                          "--num_books 50 --splits train validation (or --data_dir)")
    n = cfg['iters']
    warmup = min(100, n // 10)
    t0 = time.time()
    times = {}
    old_cwd = os.getcwd()
    os.chdir(REPO)  # (the commands' config files are relative to it)
    try:
        steps = []
        for pe in pes:
            for lr in rates:
                ckpt = os.path.join(out_dir, 'ckpt', run_name(pe, lr))
                command = ['python', 'train.py', f'configs/tiny_{pe}.py', f'--out_dir={ckpt}',
                           f'--learning_rate={lr:g}', f'--min_lr={lr / 10:g}', f'--max_iters={n}',
                           f'--lr_decay_iters={n}', f'--warmup_iters={warmup}', f'--eval_interval={n}',
                           f'--eval_iters={cfg["eval_iters"]}', f'--seed={cfg["seed"]}', '--log_interval=50'] + data
                if finished_training(command):  # (the same run, with the same settings, already done)
                    print(f"  {run_name(pe, lr)}: finished before, not rerun")
                else:
                    steps.append((run_name(pe, lr), command))
        with open(os.path.join(out_dir, 'commands.sh'), 'a') as f:
            f.write(f"# python experiments/lr_sweep.py {' '.join(argv)}\n")
        run_steps(steps, cfg, times)
    finally:
        os.chdir(old_cwd)

    # the table: validation loss per encoding (rows) and rate (columns)
    loss = {pe: {lr: final_val_loss(os.path.join(out_dir, 'ckpt', run_name(pe, lr)), n) for lr in rates} for pe in pes}
    best = {}
    lines = ['| config | ' + ' | '.join(f'lr {lr:g}' for lr in rates) + ' | best |',
             '|---|' + '---:|' * (len(rates) + 1)]
    for pe in pes:
        got = {lr: v for lr, v in loss[pe].items() if v is not None}
        best[pe] = min(got, key=got.get) if got else None
        cells = [('n/a' if lr not in got else f'**{got[lr]:.4f}**' if lr == best[pe] else f'{got[lr]:.4f}')
                 for lr in rates]
        edge = '' if best[pe] is None or len(rates) < 3 or rates[0] < best[pe] < rates[-1] else ' (edge of the grid)'
        lines.append(f'| tiny_{pe} | ' + ' | '.join(cells) + f" | {'n/a' if best[pe] is None else f'{best[pe]:g}'}{edge} |")
    from runtime import machine  # (imports torch: not at start-up)
    hw = machine(cfg['threads'])
    wall = time.time() - t0
    md = ['# Learning-rate sweep of the tiny configs', '',
          f"`python experiments/lr_sweep.py {' '.join(argv)}`".replace(' `', '`'), '',
          f"Validation loss (nats per byte) after {n} steps of 16 x 128 bytes (peak lr as in the column, "
          f"min_lr = lr / 10, warmup {warmup}, cosine decay to step {n}), seed {cfg['seed']}, "
          f"{cfg['eval_iters']} fixed validation batches. One seed: differences below ~0.01 are within "
          f"the spread between seeds (docs/small_scale_study.md).", '', *lines, '',
          f"Wall time of this invocation {wall / 60:.1f} min ({len(steps)} runs) on {hw['cpu']}, "
          f"{hw['logical_cpus']} logical CPUs, {cfg['jobs']} run(s) at a time, "
          f"{hw['torch_threads']} thread(s) each.", '']
    summary = dict(settings={k: cfg[k] for k in DEFAULTS}, hardware=hw, wall_seconds=round(wall, 1),
                   run_seconds=times, val_loss={pe: {f'{lr:g}': v for lr, v in loss[pe].items()}
                                                for pe in pes},
                   best_lr={pe: best[pe] for pe in pes})
    write_results(out_dir, md, summary, ['config', 'learning_rate', 'val_loss', 'best'],
                  [[f'tiny_{pe}', f'{lr:g}', '' if v is None else v, lr == best[pe]]
                   for pe in pes for lr, v in loss[pe].items()])
    print('\n'.join(md))
    print(f"wrote {out_dir}/results.md, results.json, results.csv")
    return summary


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, StepFailed) as e:
        sys.exit(f"error: {e}")
