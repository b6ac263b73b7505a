"""
The TAPA paper's long-context experiment in miniature, on a CPU, offline, from a fresh clone:

    python experiments/paper_in_miniature.py                  # the whole thing (docs/long_context.md: time)
    python experiments/paper_in_miniature.py --jobs=2         # two commands at once (uses 2 idle cores fully)
    python experiments/paper_in_miniature.py --quick          # every step with tiny settings, < 1 minute
                                                              # (into runs/miniature-quick/, never runs/miniature/)

The paper's claim: RoPE-family models fall apart past the context they were trained at, and
context-extension methods (PI, YaRN, ABF) plus fine-tuning only move the cliff, while TAPA extends
with light fine-tuning and keeps its perplexity past the fine-tuned length. Here, with 0.8M-parameter
byte-level models on 60 PG-19 books:

  1. prepare PG-19 mini, byte-level (only if data/pg19/byte is missing)
  2. pretrain TAPA, RoPE, ALiBi and NoPE at context 128 with configs/tiny_<pe>.py (the configs
     decide every model and optimizer setting; only the number of steps is set here)
  3. zero-shot perplexity on the validation books at 1x..16x the trained context (128..2048),
     sliding window with stride 256 (eval_ppl.py), plus RoPE with inference-time YaRN x4 and
     dynamic NTK (no fine-tuning)
  4. fine-tune to 4x (512) with finetune_long.py and configs/finetune/tiny.py: TAPA as it is, RoPE
     with Position Interpolation, with YaRN, and with ABF (rope_base 10,000 -> 500,000, see below)
  5. the same perplexity evaluation of the fine-tuned models (128..2048: 4x is the fine-tuned
     length, beyond it is extrapolation)
  6. passkey retrieval (eval_passkey.py) of the fine-tuned models
  7. one folder, --out (default runs/miniature; with --quick, runs/miniature-quick): results.md
     (the tables), results.json, results.csv, ppl.png (the curves), every evaluation's own outputs
     in eval/, the checkpoints in ckpt/, each command's output in logs/, and commands.sh (every
     command, in order)

Every step is a real command of this repository, printed before it runs and written to
commands.sh, so any of them can be rerun or changed by hand. By default each runs as its own
process; --quick runs them inside this process (the same scripts run as __main__ with runpy, so
torch is imported once), which is what the test suite does.

Why ABF base 500,000 for a 4x extension of a 128-token context: with head dim D = 32, RoPE pair i
turns at w_i = base^(-2i/D), a wavelength of 2*pi*base^(2i/D) tokens. At base 10,000 the pairs
i >= 6 (10 of 16) have wavelengths longer than 128: in pretraining they never completed a turn, so
their angles past 128 are new to the model. Keeping those angles inside the trained range at 4x the
length needs each such pair to turn >= 4x slower: base' / base >= 4^(D / 2i) for i = 6, i.e. base'
>= 10,000 * 4^(16/6) ~ 403,000. Xiong et al.'s 500,000 (the ABF paper's value) satisfies it.
(NTK's base for s = 4, 10,000 * 4^(D/(D-2)) ~ 44,000, slows only the slowest pair by 4x.)
"""

import csv
import json
import math
import os
import platform
import resource
import runpy
import shlex
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configurator import ConfigError, get_overrides  # noqa: E402

# -----------------------------------------------------------------------------
# settings (python experiments/paper_in_miniature.py --key=value; --quick alone means --quick=True)
out = 'runs/miniature'         # everything goes here
quick = False                  # tiny settings for every step (a smoke test of the whole pipeline)
pretrain_iters = 1000          # steps of each pretraining (16 x 128 tokens each)
finetune_iters = 200           # steps of each fine-tuning (4 x 512 tokens each)
encodings = 'tapa,rope,alibi,nope'  # pretrained from configs/tiny_<pe>.py; tapa and rope are needed
lengths = '128,256,512,1024,2048'   # evaluation context lengths: 1x .. 16x the trained 128
max_tokens_per_length = 16384  # scored tokens per length and model (bounds the evaluation cost)
stride = 256
abf_base = 500000.0            # RoPE base for the ABF fine-tune (see above)
passkey = True                 # passkey retrieval of the fine-tuned models
passkey_trials = 4             # random keys per (length, depth)
data_dir = ''                  # '' = data/pg19/byte, prepared from ../shared/data/pg19_mini if missing
jobs = 1                       # commands run at the same time (independent ones only)
threads = 0                    # torch threads per command (0 = torch's default)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and k not in ('REPO',) and isinstance(v, (bool, int, float, str))}
# --quick's settings, where not given; its own out folder, so that a smoke test never overwrites the
# results (and checkpoints) of a full run
QUICK = dict(out='runs/miniature-quick', pretrain_iters=4, finetune_iters=3, lengths='128,256,512',
             max_tokens_per_length=512, passkey_trials=1)
LABELS = {'tapa': 'TAPA', 'rope': 'RoPE', 'alibi': 'ALiBi', 'nope': 'NoPE', 'learned': 'learned'}
PG19_MINI = os.path.join('..', 'shared', 'data', 'pg19_mini')


class StepFailed(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# running commands


def show(argv):
    return ' '.join(shlex.quote(a) for a in argv)


def run_steps(steps, cfg, record):
    """Run (name, argv) steps, up to cfg['jobs'] at a time (they must not depend on each other).
    Each step's output goes to logs/<name>.log; its wall time is recorded."""
    for name, argv in steps:
        print(f"$ {show(argv)}", flush=True)
        with open(os.path.join(cfg['out'], 'commands.sh'), 'a') as f:
            f.write(show(argv) + '\n')
    if cfg['quick']:  # in this process, one after the other
        for name, argv in steps:
            t0 = time.time()
            run_in_process(argv, log_path(cfg, name))
            record[name] = round(time.time() - t0, 1)
            print(f"  {name}: done in {record[name]:.1f}s", flush=True)
        return
    env = dict(os.environ)
    if cfg['threads']:
        env.update(OMP_NUM_THREADS=str(cfg['threads']), MKL_NUM_THREADS=str(cfg['threads']))
    pending, running = list(steps), []
    while pending or running:
        while pending and len(running) < max(1, cfg['jobs']):
            name, argv = pending.pop(0)
            log = open(log_path(cfg, name), 'w')
            proc = subprocess.Popen([sys.executable] + argv[1:], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running.append((name, proc, log, time.time()))
        time.sleep(0.5)
        for item in list(running):
            name, proc, log, t0 = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            record[name] = round(time.time() - t0, 1)
            if proc.returncode != 0:
                for _, other, _, _ in running:
                    other.terminate()
                raise StepFailed(f"{name} failed (exit code {proc.returncode}); the end of "
                                 f"{log_path(cfg, name)}:\n{tail(log_path(cfg, name))}")
            print(f"  {name}: done in {record[name]:.1f}s", flush=True)


def run_in_process(argv, log):
    """Run `python script args...` as __main__ in this process (what the command line would do)."""
    old_argv = sys.argv
    sys.argv = argv[1:]
    try:
        with open(log, 'w') as f, redirect_stdout(f), redirect_stderr(f):
            runpy.run_path(os.path.join(REPO, argv[1]), run_name='__main__')
    except SystemExit as e:
        if e.code not in (None, 0):
            raise StepFailed(f"{show(argv)} failed: {e.code}\n{tail(log)}") from None
    finally:
        sys.argv = old_argv


def log_path(cfg, name):
    return os.path.join(cfg['out'], 'logs', f'{name}.log')


def tail(path, n=15):
    with open(path, errors='replace') as f:
        return ''.join(f.read().replace('\r', '\n').splitlines(True)[-n:])


# -----------------------------------------------------------------------------
# the machine


def hardware(cfg):
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch
    threads = cfg['threads'] or os.environ.get('OMP_NUM_THREADS') or torch.get_num_threads()
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                torch_threads=int(threads), platform=platform.platform())


def cpu_seconds():
    """CPU time of this process and of every finished child: about what the run would take on one
    idle core, however busy the machine was."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# -----------------------------------------------------------------------------
# results


def read_ppl(path, stage):
    """Rows of an eval_ppl.py JSON: label -> {length: ppl}."""
    with open(path) as f:
        r = json.load(f)
    return [dict(stage=stage, label=m['label'], trained=m['trained_block_size'], ckpt=m['ckpt'],
                 ppl={int(L): m['results'][str(L)]['ppl'] for L in r['lengths']}) for m in r['models']]


def last_val_loss(out_dir):
    """The last evaluation of a train.py/finetune_long.py run (log.jsonl): (iter, val loss)."""
    last = None
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        for line in f:
            rec = json.loads(line)
            if rec['kind'] == 'eval':
                last = (rec['iter'], rec['val_loss'])
    return last


def fmt(v):
    if v is None:
        return 'n/a'
    return f'{v:.2f}' if v < 100 else f'{v:.0f}' if v < 1e5 else f'{v:.2g}'


def ppl_table(rows, Ls):
    lines = ['| model | trained at | ' + ' | '.join(str(L) for L in Ls) + ' |',
             '|---|---:|' + '---:|' * len(Ls)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['trained']} | " + ' | '.join(fmt(r['ppl'].get(L)) for L in Ls) + ' |')
    return '\n'.join(lines)


def passkey_table(path):
    with open(path) as f:
        r = json.load(f)
    Ls, ds = r['lengths'], r['depths']
    lines = ['| model | ' + ' | '.join(str(L) for L in Ls) + ' |', '|---|' + '---:|' * len(Ls)]
    for m in r['models']:
        cells = []
        for L in Ls:
            rs = [m['results'][str(L)][str(d)] for d in ds]
            if rs[0] is None:
                cells.append('n/a')
                continue
            acc = sum(x['accuracy'] for x in rs) / len(rs)
            ll = sum(x['loglik_per_digit'] for x in rs) / len(rs)
            cells.append(f"{100 * acc:.0f}% / {ll:.2f}")
        lines.append(f"| {m['label']} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines), r


def plot(stages, Ls, path, marks):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.5), sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], stages):
        for r in rows:
            xs = [L for L in Ls if r['ppl'].get(L) is not None]
            ax.plot(xs, [r['ppl'][L] for L in xs], marker='o', label=r['label'])
        for x, text in marks:
            ax.axvline(x, color='gray', linestyle='--', linewidth=1)
            ax.text(x, 1.0, f' {text}', transform=ax.get_xaxis_transform(), va='top', fontsize=8, color='gray')
        ax.set_xscale('log', base=2)
        ax.set_xticks(Ls, [str(L) for L in Ls])
        ax.minorticks_off()
        ax.set_yscale('log')
        ax.set_xlabel('context length (bytes)')
        ax.set_title(title, fontsize=10)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel('validation perplexity (per byte)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------


def main(argv):
    argv = ['--quick=True' if a == '--quick' else a for a in argv]
    cfg = {**DEFAULTS, **get_overrides(DEFAULTS, argv, doc=__doc__)}  # -h: usage and settings
    if cfg['quick']:
        cfg.update({k: v for k, v in QUICK.items() if not any(a.startswith(f'--{k}=') for a in argv)})
        if os.path.abspath(cfg['out']) == os.path.abspath(DEFAULTS['out']):
            raise ConfigError(f"--quick --out={cfg['out']}: that is where the full run keeps its results and "
                              f"checkpoints; a quick run goes elsewhere (default {QUICK['out']})")
    pes = [p.strip() for p in cfg['encodings'].split(',') if p.strip()]
    if 'tapa' not in pes or 'rope' not in pes:
        raise ConfigError(f"--encodings={cfg['encodings']} must include tapa and rope (the paper's comparison)")
    for pe in pes:
        if not os.path.exists(os.path.join(REPO, 'configs', f'tiny_{pe}.py')):
            raise ConfigError(f"--encodings: there is no configs/tiny_{pe}.py")
    from eval_ppl import parse_lengths  # the lengths are eval_ppl.py's: its check, before any training
    try:
        Ls = parse_lengths(cfg['lengths'])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out_dir = os.path.abspath(cfg['out'])

    def rel(path):  # paths in the commands: relative to the repository root when inside it
        r = os.path.relpath(path, REPO)
        return path if r.startswith('..') else r
    cfg['out'] = out_dir
    os.makedirs(os.path.join(out_dir, 'logs'), exist_ok=True)
    os.makedirs(os.path.join(out_dir, 'eval'), exist_ok=True)
    with open(os.path.join(out_dir, 'commands.sh'), 'w') as f:
        f.write("# the commands of experiments/paper_in_miniature.py, in order; run from the repository root\n")
    ck = lambda name: rel(os.path.join(out_dir, 'ckpt', name))  # noqa: E731
    ev = lambda name: rel(os.path.join(out_dir, 'eval', name))  # noqa: E731
    if cfg['threads']:
        import torch
        torch.set_num_threads(cfg['threads'])
    t_start, cpu_start, load_start = time.time(), cpu_seconds(), os.getloadavg()
    times = {}
    py = 'python'
    old_cwd = os.getcwd()
    os.chdir(REPO)  # every command runs from the repository root, as the docs write them
    try:
        # 1. data
        data = []
        if cfg['data_dir']:
            data = [f"--data_dir={os.path.abspath(os.path.join(old_cwd, cfg['data_dir']))}"]
            if not os.path.exists(os.path.join(data[0].split('=', 1)[1], 'meta.json')):
                raise ConfigError(f"--data_dir={cfg['data_dir']} holds no prepared data (meta.json)")
        elif not os.path.exists(os.path.join(REPO, 'data', 'pg19', 'byte', 'meta.json')):
            if not os.path.isdir(os.path.join(REPO, PG19_MINI)):
                raise ConfigError(f"no prepared data in data/pg19/byte and no {PG19_MINI} to prepare it from: "
                                  f"download some books (python data/pg19/prepare.py --tokenizer byte "
                                  f"--num_books 50 --splits train validation), put PG-19 books in {PG19_MINI} "
                                  f"(train/ validation/ test/ of <id>.txt) or pass --data_dir")
            run_steps([('prepare', [py, 'data/pg19/prepare.py', '--tokenizer', 'byte', '--source', PG19_MINI])],
                      cfg, times)
        quick_train = ['--eval_iters=1', '--log_interval=1', '--warmup_iters=1', '--batch_size=4'] if cfg['quick'] else []

        # 2. pretraining at context 128
        n = cfg['pretrain_iters']
        run_steps([(f'pretrain_{pe}', [py, 'train.py', f'configs/tiny_{pe}.py', f'--out_dir={ck(pe)}',
                                       f'--max_iters={n}', f'--lr_decay_iters={n}'] + data + quick_train)
                   for pe in pes], cfg, times)

        # 3. zero-shot evaluation, and RoPE with inference-time extension (no fine-tuning)
        common = [f'--lengths={",".join(map(str, Ls))}', f'--max_tokens_per_length={cfg["max_tokens_per_length"]}',
                  f'--stride={cfg["stride"]}', '--protocol=sliding', '--quiet=True'] + data  # the README's table
        evals = [('eval_zeroshot', [py, 'eval_ppl.py', f'--ckpt={",".join(ck(pe) for pe in pes)}',
                                    f'--labels={",".join(LABELS[pe] for pe in pes)}', f'--out={ev("zeroshot")}'] + common),
                 ('eval_zeroshot_rope_yarn', [py, 'eval_ppl.py', f'--ckpt={ck("rope")}', '--rope_scaling=yarn',
                                              '--rope_factor=4', '--labels=RoPE + YaRN x4 (inference only)',
                                              f'--out={ev("zeroshot_rope_yarn4")}'] + common),
                 ('eval_zeroshot_rope_dynntk', [py, 'eval_ppl.py', f'--ckpt={ck("rope")}', '--rope_scaling=dynamic_ntk',
                                                '--labels=RoPE + dynamic NTK (inference only)',
                                                f'--out={ev("zeroshot_rope_dynntk")}'] + common)]
        run_steps(evals, cfg, times)

        # 4. fine-tuning to 4x (512)
        m = cfg['finetune_iters']
        quick_ft = ['--warmup_iters=1', f'--eval_interval={m}'] if cfg['quick'] else []
        # (out_dir name, label (no commas: eval_ppl splits --labels on them), pretrained model, extension)
        finetunes = [('tapa-ft4x', 'TAPA (ft 512)', 'tapa', []),
                     ('rope-ft4x-pi', 'RoPE + PI x4 (ft 512)', 'rope', ['--rope_scaling=pi']),
                     ('rope-ft4x-yarn', 'RoPE + YaRN x4 (ft 512)', 'rope', ['--rope_scaling=yarn']),
                     ('rope-ft4x-abf', f'RoPE + ABF base {cfg["abf_base"]:g} (ft 512)', 'rope',
                      [f'--rope_base={cfg["abf_base"]:g}'])]
        run_steps([(f'finetune_{name}', [py, 'finetune_long.py', 'configs/finetune/tiny.py', f'--init_dir={ck(src)}',
                                         f'--out_dir={ck(name)}', f'--max_iters={m}'] + extra + quick_ft)
                   for name, _, src, extra in finetunes], cfg, times)

        # 5. evaluation of the fine-tuned models (and 6. passkey retrieval)
        steps = [('eval_finetuned', [py, 'eval_ppl.py', f'--ckpt={",".join(ck(f[0]) for f in finetunes)}',
                                     f'--labels={",".join(f[1] for f in finetunes)}', f'--out={ev("finetuned")}'] + common)]
        if cfg['passkey']:
            steps.append(('passkey', [py, 'eval_passkey.py', f'--ckpt={",".join(ck(f[0]) for f in finetunes)}',
                                      f'--labels={",".join(f[1] for f in finetunes)}',
                                      f'--lengths={",".join(map(str, Ls))}', '--depths=0,0.5,1',
                                      f'--num_trials={cfg["passkey_trials"]}', f'--out={ev("passkey")}', '--quiet=True']))
        run_steps(steps, cfg, times)
    finally:
        os.chdir(old_cwd)

    # 7. the tables, JSON, CSV and plot
    wall, cpu = time.time() - t_start, cpu_seconds() - cpu_start
    load_end = os.getloadavg()
    zeroshot = (read_ppl(os.path.join(out_dir, 'eval', 'zeroshot.json'), 'zero-shot')
                + read_ppl(os.path.join(out_dir, 'eval', 'zeroshot_rope_yarn4.json'), 'zero-shot')
                + read_ppl(os.path.join(out_dir, 'eval', 'zeroshot_rope_dynntk.json'), 'zero-shot'))
    finetuned = read_ppl(os.path.join(out_dir, 'eval', 'finetuned.json'), 'fine-tuned 4x')
    val = {name: last_val_loss(os.path.join(out_dir, 'ckpt', name)) for name in pes + [f[0] for f in finetunes]}
    hw = hardware(cfg)
    command = 'python experiments/paper_in_miniature.py ' + ' '.join(argv)
    summary = dict(command=command.strip(), settings={k: cfg[k] for k in DEFAULTS}, hardware=hw,
                   wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1), load_average_start=load_start,
                   load_average_end=load_end, step_seconds=times, lengths=Ls,
                   final_val_loss={k: (None if v is None else dict(iter=v[0], val_loss=v[1])) for k, v in val.items()},
                   perplexity=zeroshot + finetuned)
    md = [f"# TAPA vs RoPE: the paper in miniature", '',
          f"`{summary['command']}`", '',
          f"Hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs, torch {hw['torch']} "
          f"({hw['torch_threads']} threads per command, {cfg['jobs']} command(s) at a time). "
          f"Wall time {wall / 60:.1f} min; CPU time {cpu / 60:.1f} min. Load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} "
          f"at the end (above the CPU count means other jobs shared the CPU).", '',
          f"Byte-level models (4 layers, n_embd 128, 4 heads, 0.8M parameters) pretrained {cfg['pretrain_iters']} "
          f"steps of 16 x 128 bytes; fine-tuned {cfg['finetune_iters']} steps of 4 x 512 bytes. Validation "
          f"perplexity per byte, sliding window (stride {cfg['stride']}), the same "
          f"{cfg['max_tokens_per_length']:,}-byte budget of PG-19 validation text at every length.", '',
          '## Zero-shot (trained at 128)', '', ppl_table(zeroshot, Ls), '',
          '## Fine-tuned to 4x (512)', '', ppl_table(finetuned, Ls), '',
          '## Final validation loss of each run (nats per byte, at its own context)', '',
          '| run | iter | val loss |', '|---|---:|---:|']
    md += [f"| {k} | {v[0]} | {v[1]:.4f} |" for k, v in val.items() if v is not None]
    if cfg['passkey']:
        table, _ = passkey_table(os.path.join(out_dir, 'eval', 'passkey.json'))
        md += ['', f"## Passkey retrieval of the fine-tuned models (accuracy / log-likelihood per digit; "
                   f"chance -2.30; {cfg['passkey_trials']} keys x depths 0, 0.5, 1)", '', table]
    md += ['', '## Time per step (wall seconds)', '', '| step | seconds |', '|---|---:|']
    md += [f"| {k} | {v} |" for k, v in times.items()]
    md += ['', 'Commands: commands.sh; outputs of each: logs/; every evaluation: eval/.', '']
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(md))
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(summary, f, indent=2)
        f.write('\n')
    with open(os.path.join(out_dir, 'results.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['stage', 'label', 'trained_block_size', 'length', 'ppl'])
        for r in zeroshot + finetuned:
            for L in Ls:
                p = r['ppl'].get(L)
                w.writerow([r['stage'], r['label'], r['trained'], L, '' if p is None or not math.isfinite(p) else p])
    png = plot([('zero-shot: trained at 128, no fine-tuning', zeroshot), ('fine-tuned to 4x (512)', finetuned)],
               Ls, os.path.join(out_dir, 'ppl.png'), [(128, 'trained 128'), (512, 'fine-tuned 512')])
    print()
    print('\n'.join(md))
    print(f"wrote {out_dir}/results.md, results.json, results.csv" + (", ppl.png" if png else ''))
    print(f"total wall time {wall / 60:.1f} min (CPU time {cpu / 60:.1f} min) on {hw['cpu']}, "
          f"{hw['logical_cpus']} logical CPUs; load average {'/'.join(f'{x:.1f}' for x in load_end)}")
    return summary


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, StepFailed) as e:
        sys.exit(f"error: {e}")
