"""
The TAPA paper's long-context experiment in miniature, on a CPU, offline, from a fresh clone:

    python experiments/paper_in_miniature.py                  # the whole thing, one seed (docs/long_context.md: time)
    python experiments/paper_in_miniature.py --seeds=3        # every training 3 times: means, spreads between seeds
    python experiments/paper_in_miniature.py --jobs=2         # two commands at once (uses 2 idle cores fully)
    python experiments/paper_in_miniature.py --encodings=t5,kerple --finetune=False --out=runs/miniature-more
                                                              # zero-shot rows for more encodings, cheaply
    python experiments/paper_in_miniature.py --quick          # every step with tiny settings, < 1 minute
                                                              # (into runs/miniature-quick/, never runs/miniature/)

The paper's claim: RoPE-family models fall apart past the context they were trained at, and
context-extension methods (PI, YaRN, ABF) plus fine-tuning only move the cliff, while TAPA extends
with light fine-tuning and keeps its perplexity past the fine-tuned length. Here, with 0.8M-parameter
byte-level models on 60 PG-19 books:

  1. prepare PG-19 mini, byte-level (only if data/pg19/byte is missing)
  2. pretrain TAPA (small-model setting, linear phase: the TAPA to compare at this size; the paper's
     setting, configs/tiny_tapa.py, stalls here), RoPE, ALiBi and NoPE at context 128 with
     configs/tiny_<pe>.py (the configs decide every model and optimizer setting; only the number of
     steps is set here), once per seed: --seeds=N runs each N times with train.py's --seed = 1337,
     1338, ... (the initial weights and the batches), into ckpt/<pe>-s<seed>
  3. zero-shot perplexity on the TEST books at 1x..16x the trained context (128..2048) with
     eval_ppl.py's own protocol (--protocol=spans, its default: the same scored spans at every
     length, past each book's front matter, so along a curve only the context changes), plus RoPE
     with inference-time YaRN x4 and dynamic NTK (no fine-tuning). The test split, because the
     learning rates were tuned on the validation split: numbers there would flatter the models.
  4. fine-tune to 4x (512) with finetune_long.py and configs/finetune/tiny.py: the TAPA of
     --encodings (its first tapa* config) as it is, RoPE with Position Interpolation, with YaRN, and
     with ABF (rope_base 10,000 -> 500,000, see below); each seed's fine-tune starts from that seed's
     pretrained model and takes the same --seed. --finetune=False skips steps 4-6.
  5. the same perplexity evaluation of the fine-tuned models (128..2048: 4x is the fine-tuned
     length, beyond it is extrapolation)
  6. passkey retrieval (eval_passkey.py) of the fine-tuned models
  7. one folder, --out (default runs/miniature; with --quick, runs/miniature-quick): results.md
     (the tables), results.json, results.csv, ppl.png (the curves and their intervals), every
     evaluation's own outputs in eval/ (one per model and seed), the checkpoints in ckpt/, each command's
     output in logs/, and commands.sh (every command, in order)

What the tables report, per model and length: the mean over seeds of the perplexity, the spread
between seeds (min-max), and a 95% interval from a paired bootstrap over documents. Every model of
every seed is scored on the same spans of the same books, so a resample draws the books once (with
replacement) and the same draw serves every seed, length and model: each resample recomputes every
seed's perplexity from the drawn books' sums (eval_ppl.py's doc_nll and doc_tokens), then their mean.
The ratio to the 1x column is taken per seed, then averaged (a mean of ratios, not a ratio of means),
with its interval from the same draws. With one seed the interval is eval_ppl.py's own. The interval
is the books' part of the uncertainty, the spread the seeds' part; with 5 test books the interval
understates the variance between books (results.md says so).

The budget: --max_tokens_per_length=8192 scored bytes per length and model, 256 spans of 32 bytes
(a quarter of the shortest length) dealt to the 5 test books. Each span is a forward pass of L
bytes, so a length costs 256 passes of L, most of it at 2048, where ALiBi's bias blocks
(fast_attention.py) are the slowest: an evaluated model costs from about a third (NoPE) to 2.5x
(ALiBi) of its 1,000-step pretraining's CPU time. 16384, the older budget, doubles that.

Every step is a real command of this repository, printed before it runs and written to
commands.sh, so any of them can be rerun or changed by hand. What already finished in --out is not run
again: a pretraining whose checkpoint reached its last step with the same settings; an evaluation
whose record (eval/<name>-s<seed>.inputs.json: its command and the SHA-256 of its checkpoints and
text) still matches; a fine-tune whose record (ckpt/<name>-s<seed>/finetune.inputs.json: its command
and the SHA-256 of its config file, of the pretrained checkpoint and of the one it wrote) still
matches. So --seeds=3 after --seeds=1, or the fine-tunes after --finetune=False, run only what is
new, and an interrupted run does not redo what it finished. By default each runs as its own
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
seeds = 1                      # runs of every pretraining and fine-tuning, with seeds 1337, 1338, ...
pretrain_iters = 1000          # steps of each pretraining (16 x 128 tokens each)
finetune_iters = 200           # steps of each fine-tuning (4 x 512 tokens each)
finetune = True                # False: no fine-tuning, no evaluation of it, no passkey (zero-shot rows only)
encodings = 'tapa_small_linear,rope,alibi,nope'  # configs/tiny_<pe>.py; with finetune, a tapa* and rope
lengths = '128,256,512,1024,2048'   # evaluation context lengths: 1x .. 16x the trained 128
split = 'test'                 # the books the report scores; the learning rates were tuned on 'validation'
max_tokens_per_length = 8192   # scored tokens per length and model (bounds the evaluation cost, see above)
bootstrap = 1000               # resamples of the documents for the 95% intervals (0 = none)
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
FIRST_SEED = 1337  # train.py's default seed: one seed gives the runs a plain train.py command gives
# the row label of each tiny config (no commas: eval_ppl.py splits --labels on them); any other
# configs/tiny_<name>.py is labelled <name>
LABELS = {'tapa': 'TAPA paper setting', 'tapa_small': 'TAPA small-model', 'tapa_small_linear': 'TAPA small-model linear',
          'rope': 'RoPE', 'alibi': 'ALiBi', 'nope': 'NoPE', 'learned': 'learned', 'sinusoidal': 'sinusoidal',
          't5': 'T5 bias', 'kerple': 'Kerple', 'xpos': 'xPos', 'fire': 'FIRE', 'cope': 'CoPE'}
PG19_MINI = os.path.join('..', 'shared', 'data', 'pg19_mini')
FEW_DOCS = 10  # below this many documents, the intervals understate the variance between books


class StepFailed(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# running commands


def script_settings(argv, defaults, quick, doc, what):
    """The settings of an experiments/ script from its command line (--key=value; --quick alone means
    --quick=True): with --quick, its quick values where not given, and never the out folder of the full
    `what`, so that a smoke test cannot overwrite real results. Returns (argv, settings)."""
    argv = ['--quick=True' if a == '--quick' else a for a in argv]
    cfg = {**defaults, **get_overrides(defaults, argv, doc=doc)}
    if cfg['quick']:
        cfg.update({k: v for k, v in quick.items() if not any(a.startswith(f'--{k}=') for a in argv)})
        if os.path.abspath(cfg['out']) == os.path.abspath(defaults['out']):
            raise ConfigError(f"--quick --out={cfg['out']}: that is where the full {what} keeps its results; "
                              f"a quick run goes elsewhere (default {quick['out']})")
    if os.path.exists(cfg['out']) and not os.path.isdir(cfg['out']):
        raise ConfigError(f"--out={cfg['out']} is a file, not a folder: give a folder for the results")
    if cfg['jobs'] < 1 or cfg['threads'] < 0:
        raise ConfigError(f"--jobs={cfg['jobs']} --threads={cfg['threads']}: at least 1 job at a time, and 0 "
                          f"(torch's default) or more threads")
    return argv, cfg


def show(argv):
    return ' '.join(shlex.quote(a) for a in argv)


def finished_training(argv):
    """True when the out_dir of this `python train.py ...` command already holds the checkpoint of a run
    that reached its last step with exactly the settings the command gives (out_dir aside): such a
    pretraining is not run again, so an interrupted miniature resumes without retraining, and a
    --finetune=False run after a full one reuses its pretrained models."""
    import train  # (torch is imported here, not at start-up)
    from runtime import TrainError, load_checkpoint
    try:
        cfg, _ = train.resolve_config(get_overrides(train.DEFAULTS, argv[2:], train.OPTIONAL_TYPES))
        path = os.path.join(cfg.out_dir, 'ckpt.pt')
        if not os.path.exists(path):
            return False
        ckpt = load_checkpoint(path)
    except (ConfigError, TrainError, OSError):
        return False  # the run itself will say what is wrong
    same = {k: v for k, v in ckpt['config'].items() if k != 'out_dir'} == {k: v for k, v in cfg.items() if k != 'out_dir'}
    return same and ckpt['iter_num'] == cfg.max_iters


def setting(argv, key):
    """The value of --key=value in a command's argv (the commands here always spell it that way)."""
    return [a.split('=', 1)[1] for a in argv if a.startswith(f'--{key}=')][0]


def digests(paths):
    """{path: SHA-256 of its bytes}, or None when one of the files is missing."""
    import hashlib
    out = {}
    for path in paths:
        if not os.path.exists(path):
            return None
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        out[path] = h.hexdigest()
    return out


def read_json(path):
    """The JSON value in the file at path, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_record(path, inputs_now):
    """True when the JSON record at path (written when a step finished) equals inputs_now(), the
    inputs that step would read today. A missing or unreadable record, or a record of None (from a
    file that was missing then), never counts as finished."""
    record = read_json(path)
    return record is not None and record == inputs_now()


def skip_finished(steps, finished, why, cfg):
    """The steps that are not finished(argv) yet; each one left out is printed with why, and written to
    commands.sh all the same (marked), so that it lists every command of the result, reused or run."""
    todo = []
    for name, argv in steps:
        if finished(argv):
            print(f"  {name}: {show(argv)} finished before, {why}: not run again", flush=True)
            with open(os.path.join(cfg['out'], 'commands.sh'), 'a') as f:
                f.write(f"{show(argv)}  # finished before: reused\n")
        else:
            todo.append((name, argv))
    return todo


def evaluation_inputs(argv, folder, split):
    """What an evaluation command read: its own arguments and the SHA-256 of every file it depends on
    (each --ckpt's ckpt.pt, the split's tokens and document index). Equal records mean an equal result."""
    files = digests([os.path.join(c, 'ckpt.pt') for c in setting(argv, 'ckpt').split(',')]
                    + [os.path.join(folder, f'{split}{ext}') for ext in ('.bin', '.docs.npy')])
    return None if files is None else dict(command=list(argv), files=files)


def finished_evaluation(argv, folder, split):
    """True when this eval_ppl.py (or eval_passkey.py) command already ran to the end on the very same
    checkpoints and text: its JSON is there and the record written beside it when it finished
    (<out>.inputs.json) matches. Such an evaluation is not run again (a miniature that adds seeds or
    fine-tunes reuses the rest)."""
    out = setting(argv, 'out')
    return os.path.exists(out + '.json') and same_record(out + '.inputs.json', lambda: evaluation_inputs(argv, folder, split))


def finetune_record(argv):
    """What a finetune_long.py command read and wrote: its own arguments and the SHA-256 of its config
    file, of the pretrained checkpoint (--init_dir) and of the fine-tuned one (--out_dir)."""
    files = digests([argv[2], os.path.join(setting(argv, 'init_dir'), 'ckpt.pt'),
                     os.path.join(setting(argv, 'out_dir'), 'ckpt.pt')])
    return None if files is None else dict(command=list(argv), files=files)


def finished_finetune(argv):
    """True when this finetune_long.py command already ran to its end from the very same pretrained
    checkpoint, and its checkpoint is still the one it wrote: the record written when it finished
    (<out_dir>/finetune.inputs.json) matches. Such a fine-tune is not run again."""
    return same_record(os.path.join(setting(argv, 'out_dir'), 'finetune.inputs.json'), lambda: finetune_record(argv))


def run_steps(steps, cfg, record, done=None, save=None):
    """Run (name, argv) steps, up to cfg['jobs'] at a time (they must not depend on each other).
    Each step's output goes to logs/<name>.log; its wall time is recorded (record[name], and the whole
    record written to the JSON file save, if given), and done(name, argv), if given, is called as soon
    as a step has succeeded (so an interruption keeps what finished)."""
    def finished(name, argv):
        print(f"  {name}: done in {record[name]:.1f}s", flush=True)
        if save:
            with open(save, 'w') as f:
                json.dump(record, f, indent=1)
        if done:
            done(name, argv)
    for name, argv in steps:
        print(f"$ {show(argv)}", flush=True)
        with open(os.path.join(cfg['out'], 'commands.sh'), 'a') as f:
            f.write(show(argv) + '\n')
    if cfg['quick']:  # in this process, one after the other
        for name, argv in steps:
            t0 = time.time()
            run_in_process(argv, log_path(cfg, name))
            record[name] = round(time.time() - t0, 1)
            finished(name, argv)
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
            running.append((name, argv, proc, log, time.time()))
        time.sleep(0.5)
        for item in list(running):
            name, argv, proc, log, t0 = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            record[name] = round(time.time() - t0, 1)
            if proc.returncode != 0:
                for _, _, other, _, _ in running:
                    other.terminate()
                raise StepFailed(f"{name} failed (exit code {proc.returncode}); the end of "
                                 f"{log_path(cfg, name)}:\n{tail(log_path(cfg, name))}")
            finished(name, argv)


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


def cpu_seconds():
    """CPU time of this process and of every finished child: about what the run would take on one
    idle core, however busy the machine was."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# -----------------------------------------------------------------------------
# results: every seed's evaluations, pooled


def read_eval(path):
    """The models of an eval_ppl.py JSON with their sums per document: a list of dict(label, trained,
    ckpt, cells = {L: (doc_nll, doc_tokens) arrays, or None where the model has no value at L}), and
    what was scored (split, span, skip, documents, doc_ids, ...)."""
    import numpy as np
    with open(path) as f:
        r = json.load(f)
    models = []
    for m in r['models']:
        cells = {}
        for L in r['lengths']:
            c = m['results'][str(L)]
            if c['ppl'] is None:
                cells[int(L)] = None
            elif 'doc_nll' not in c:
                raise StepFailed(f"{path} holds no sums per document (doc_nll): it was written by an older "
                                 f"eval_ppl.py; run the evaluation again (commands.sh)")
            else:
                cells[int(L)] = (np.asarray(c['doc_nll'], dtype=np.float64), np.asarray(c['doc_tokens'], dtype=np.int64))
        models.append(dict(label=m['label'], trained=m['trained_block_size'], ckpt=m['ckpt'], cells=cells))
    scored = {k: r.get(k) for k in ('split', 'protocol', 'span', 'skip', 'documents', 'too_short', 'too_short_tokens',
                                    'doc_ids')}
    return models, scored


def run_ppl(nll, tokens):
    """One run's perplexity from its sums per document, as eval_ppl.py computes it."""
    return math.exp(min(float(nll.sum() / tokens.sum()), 700.0))


def aggregate(cells, lengths, n_resamples=1000, seed=0, against=None):
    """The tables' numbers: means over seeds, spreads between seeds and paired-bootstrap intervals.

    cells: {row: [one entry per seed: {L: (doc_nll, doc_tokens), or None where the row has no value
    at L}]}, every array over the same documents in the same order. Returns {row: {L: None or dict(
    mean, spread=[min, max], per_seed, ci=[lo, hi], ratio, ratio_spread, ratio_per_seed, ratio_ci)}}.
    The ratio is to the first length, taken per seed and then averaged: a mean of ratios (a ratio of
    the means would mix one seed's 1x with another's 16x). against: {row: reference row} adds, where
    both have a value, diff_to (the reference), diff = this row's mean perplexity minus the
    reference's and diff_ci, its interval: is the gap between two models larger than the books explain?

    The interval: n_resamples times, draw as many documents as there are, with replacement, ONCE, and
    use that draw for every row, seed and length: every model was scored on the same spans, so a
    resample is one alternative set of books that all of them face (paired). Each resample recomputes
    every seed's perplexity from the drawn documents' sums and takes the same statistic as the point
    estimate (the mean over seeds, the mean of the per-seed ratios). The draws are eval_ppl.py's
    (add_intervals: the same generator and seed), so with one seed the intervals are its own."""
    import numpy as np
    sizes = {len(a) for runs in cells.values() for run in runs for c in run.values() if c is not None for a in c}
    if len(sizes) > 1:
        raise ValueError(f"the sums per document cover different numbers of documents ({sorted(sizes)}): "
                         f"the evaluations did not score the same documents")
    n_docs = sizes.pop() if sizes else 0
    draws = np.random.default_rng(seed).choice(n_docs, size=(n_resamples, n_docs)) if n_resamples and n_docs else None

    def resampled(nll, tokens):  # the perplexity of every resample: (n_resamples,)
        return np.exp(np.minimum(nll[draws].sum(1) / np.maximum(tokens[draws].sum(1), 1), 700.0))

    def interval(x):
        return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]
    out, boots = {}, {}
    for row, runs in cells.items():
        have = [L for L in lengths if all(run.get(L) is not None for run in runs)]
        point = {L: np.array([run_ppl(*run[L]) for run in runs]) for L in have}  # (seeds,)
        boot = {L: np.stack([resampled(*run[L]) for run in runs]) for L in have} if draws is not None else {}
        boots[row] = boot
        first = lengths[0] if lengths[0] in have else None  # the 1x column
        out[row] = {}
        for L in lengths:
            if L not in have:
                out[row][L] = None
                continue
            p = point[L]
            stats = dict(mean=float(p.mean()), spread=[float(p.min()), float(p.max())], per_seed=p.tolist(),
                         ci=interval(boot[L].mean(0)) if boot else None)
            if first is not None:
                q = p / point[first]  # each seed's own ratio
                stats.update(ratio=float(q.mean()), ratio_spread=[float(q.min()), float(q.max())],
                             ratio_per_seed=q.tolist(),
                             ratio_ci=interval((boot[L] / boot[first]).mean(0)) if boot else None)
            out[row][L] = stats
    for row, ref in (against or {}).items():
        for L in lengths:
            mine, theirs = out[row][L], out[ref][L]
            if row != ref and mine is not None and theirs is not None:
                # each resample's mean over seeds, this row's minus the reference's, on the same books
                mine.update(diff_to=ref, diff=mine['mean'] - theirs['mean'],
                            diff_ci=interval(boots[row][L].mean(0) - boots[ref][L].mean(0)) if boots[row] else None)
    return out


def val_losses(out_dir):
    """{iter: validation loss} of every evaluation of a train.py/finetune_long.py run (its log.jsonl;
    a resumed run's repeated evaluation counts once, the later one). OSError when there is no log."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {r['iter']: r['val_loss'] for r in map(json.loads, f) if r['kind'] == 'eval'}


def last_val_loss(out_dir):
    """The last evaluation of a run: (iter, val loss), or None when it has none yet."""
    losses = val_losses(out_dir)
    return (max(losses), losses[max(losses)]) if losses else None


def write_results(out_dir, md, summary, header, rows):
    """An experiment's three result files in out_dir: results.md (the lines md), results.json (summary)
    and results.csv (header, then rows)."""
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(md))
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(summary, f, indent=2)
        f.write('\n')
    with open(os.path.join(out_dir, 'results.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def fmt(v):
    if v is None:
        return 'n/a'
    return f'{v:.2f}' if v < 100 else f'{v:.0f}' if v < 1e5 else f'{v:.2g}'


def fmt_ratio(v):
    return f'{v:.2f}'


def fmt_diff(v):
    return f'{v:+.2f}' if abs(v) < 100 else f'{v:+.0f}'


def cell(stats, what, n_seeds):
    """'mean [lo, hi] (min-max)' of a perplexity (what='mean') or a ratio (what='ratio'); 'diff [lo, hi]'
    of a difference to the reference row (what='diff': the seeds of two models are not pairs, so no
    spread)."""
    if stats is None or stats.get(what) is None:
        return 'n/a'
    if what == 'diff':
        ci = stats['diff_ci']
        return fmt_diff(stats['diff']) + (f' [{fmt_diff(ci[0])}, {fmt_diff(ci[1])}]' if ci else '')
    f = fmt if what == 'mean' else fmt_ratio
    ci, spread = stats['ci' if what == 'mean' else 'ratio_ci'], stats['spread' if what == 'mean' else 'ratio_spread']
    text = f(stats[what])
    if ci:
        text += f' [{f(ci[0])}, {f(ci[1])}]'
    if n_seeds > 1:
        text += f' ({f(spread[0])}-{f(spread[1])})'
    return text


def ppl_table(rows, Ls, what, n_seeds):
    lines = ['| model | trained at | ' + ' | '.join(str(L) for L in Ls) + ' |', '|---|---:|' + '---:|' * len(Ls)]
    for r in rows:  # (a ratio at the first length is 1 by definition)
        lines.append(f"| {r['label']} | {r['trained']} | " + ' | '.join(
            '1' if what == 'ratio' and i == 0 and r['results'][L] else cell(r['results'][L], what, n_seeds)
            for i, L in enumerate(Ls)) + ' |')
    return '\n'.join(lines)


def passkey_table(paths):
    """Accuracy / log-likelihood per digit of each model and length: the mean over the seeds' runs
    (paths, one eval_passkey.py JSON each), their depths and keys."""
    acc, ll, labels, Ls = {}, {}, [], []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        Ls = r['lengths']
        for m in r['models']:
            if m['label'] not in labels:
                labels.append(m['label'])
            for L in Ls:
                rs = [m['results'][str(L)][str(d)] for d in r['depths']]
                if rs[0] is not None:
                    acc.setdefault((m['label'], L), []).append(sum(x['accuracy'] for x in rs) / len(rs))
                    ll.setdefault((m['label'], L), []).append(sum(x['loglik_per_digit'] for x in rs) / len(rs))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = ['| model | ' + ' | '.join(str(L) for L in Ls) + ' |', '|---|' + '---:|' * len(Ls)]
    for label in labels:
        cells = [f"{100 * mean(acc[(label, L)]):.0f}% / {mean(ll[(label, L)]):.2f}" if (label, L) in acc else 'n/a'
                 for L in Ls]
        lines.append(f"| {label} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(panels, Ls, path, marks, ylabel):
    """One panel per stage: each row's mean over seeds, its 95% interval as a band, and (with several
    seeds) each seed's own value as a dot."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        for r in rows:
            xs = [L for L in Ls if r['results'][L] is not None]
            line, = ax.plot(xs, [r['results'][L]['mean'] for L in xs], marker='o', label=r['label'])
            band = [L for L in xs if r['results'][L]['ci']]
            if band:
                ax.fill_between(band, [r['results'][L]['ci'][0] for L in band], [r['results'][L]['ci'][1] for L in band],
                                color=line.get_color(), alpha=0.15, linewidth=0)
            if len(r['seeds']) > 1:
                ax.scatter([L for L in xs for _ in r['seeds']], [v for L in xs for v in r['results'][L]['per_seed']],
                           s=8, color=line.get_color(), alpha=0.6)
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
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def csv_table(rows, Ls, seeds):
    """results.csv's header and rows: one row per stage, label and length, with the mean, the interval,
    the spread and each seed's value, of the perplexity and of its ratio to the first length (empty
    where n/a)."""
    def num(v):
        return '' if v is None else v
    header = (['stage', 'label', 'trained_block_size', 'length', 'seeds', 'ppl_mean', 'ppl_lo', 'ppl_hi',
               'ppl_min', 'ppl_max', 'ratio_mean', 'ratio_lo', 'ratio_hi', 'ratio_min', 'ratio_max',
               'diff_to', 'diff_mean', 'diff_lo', 'diff_hi']
              + [f'ppl_s{sd}' for sd in seeds] + [f'ratio_s{sd}' for sd in seeds])
    out = []
    for r in rows:
        for L in Ls:
            st = r['results'][L] or {}
            ci, rci = st.get('ci') or [None, None], st.get('ratio_ci') or [None, None]
            spread, rspread = st.get('spread') or [None, None], st.get('ratio_spread') or [None, None]
            per, rper = st.get('per_seed') or [None] * len(seeds), st.get('ratio_per_seed') or [None] * len(seeds)
            dci = st.get('diff_ci') or [None, None]
            ref = st.get('diff_to')  # (stage, label) of the reference row
            out.append([r['stage'], r['label'], r['trained'], L, len(seeds), num(st.get('mean')), *map(num, ci),
                        *map(num, spread), num(st.get('ratio')), *map(num, rci), *map(num, rspread),
                        '' if ref is None else ref[1], num(st.get('diff')), *map(num, dci)]
                       + [num(v) for v in per] + [num(v) for v in rper])
    return header, out


def check_split(folder, split, cfg):
    """The prepared data must hold the split the report scores (older preparations had no test)."""
    with open(os.path.join(folder, 'meta.json')) as f:
        have = list(json.load(f)['splits'])
    if split not in have:
        raise ConfigError(f"{folder} has no {split} split (it has {', '.join(have)}): prepare it again with "
                          f"python data/pg19/prepare.py --tokenizer byte --source {PG19_MINI} (or --num_books 50 "
                          f"to download; every split by default), or pass --split=validation"
                          + (" or another --data_dir" if cfg['data_dir'] else ''))


# -----------------------------------------------------------------------------


def main(argv):
    argv, cfg = script_settings(argv, DEFAULTS, QUICK, __doc__, 'run')  # -h: usage and settings
    pes = [p.strip() for p in cfg['encodings'].split(',') if p.strip()]
    if not pes:
        raise ConfigError("--encodings is empty: name configs/tiny_<pe>.py files, e.g. --encodings=tapa_small_linear,rope")
    twice = sorted({pe for pe in pes if pes.count(pe) > 1})
    if twice:
        raise ConfigError(f"--encodings={cfg['encodings']} names {', '.join(twice)} twice: each once (--seeds repeats runs)")
    for pe in pes:
        if not os.path.exists(os.path.join(REPO, 'configs', f'tiny_{pe}.py')):
            raise ConfigError(f"--encodings: there is no configs/tiny_{pe}.py")
    tapa = next((pe for pe in pes if pe.startswith('tapa')), None)  # the TAPA that is fine-tuned
    if cfg['finetune'] and (tapa is None or 'rope' not in pes):
        raise ConfigError(f"--encodings={cfg['encodings']} must include a TAPA config (e.g. tapa_small_linear) and "
                          f"rope: the fine-tuned comparison is theirs (--finetune=False: zero-shot rows only)")
    used = ['seeds', 'pretrain_iters']  # the counts this run uses, checked before any step runs
    if cfg['finetune']:
        used += ['finetune_iters'] + (['passkey_trials'] if cfg['passkey'] else [])
    for key in used:
        if cfg[key] < 1:
            raise ConfigError(f"--{key}={cfg[key]} must be at least 1")
    if cfg['finetune'] and not cfg['abf_base'] > 1:
        raise ConfigError(f"--abf_base={cfg['abf_base']:g} must be a RoPE base, > 1 (the ABF paper's 500000)")
    if cfg['split'] not in ('validation', 'test'):
        raise ConfigError(f"--split={cfg['split']}: use test (the report) or validation (where the learning rates "
                          f"were tuned)")
    if cfg['bootstrap'] < 0:
        raise ConfigError(f"--bootstrap={cfg['bootstrap']} must be >= 0 (0 = no intervals)")
    from eval_ppl import parse_lengths  # the lengths are eval_ppl.py's: its check, before any training
    try:
        Ls = parse_lengths(cfg['lengths'])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    span = max(1, Ls[0] // 4)  # eval_ppl.py's default span: what one scored window adds
    if cfg['max_tokens_per_length'] < 0 or 0 < cfg['max_tokens_per_length'] < span:
        raise ConfigError(f"--max_tokens_per_length={cfg['max_tokens_per_length']}: give at least one span of "
                          f"{span} tokens (a quarter of the shortest length), or 0 for everything")
    seeds = [FIRST_SEED + i for i in range(cfg['seeds'])]
    out_dir = os.path.abspath(cfg['out'])

    def rel(path):  # paths in the commands: relative to the repository root when inside it
        r = os.path.relpath(path, REPO)
        return path if r.startswith('..') else r
    cfg['out'] = out_dir
    os.makedirs(os.path.join(out_dir, 'logs'), exist_ok=True)
    os.makedirs(os.path.join(out_dir, 'eval'), exist_ok=True)
    with open(os.path.join(out_dir, 'commands.sh'), 'w') as f:
        f.write("# the commands of experiments/paper_in_miniature.py, in order; run from the repository root\n")
    ck = lambda name, sd: rel(os.path.join(out_dir, 'ckpt', f'{name}-s{sd}'))  # noqa: E731
    ev = lambda name, sd: rel(os.path.join(out_dir, 'eval', f'{name}-s{sd}'))  # noqa: E731
    label = lambda pe: LABELS.get(pe, pe)  # noqa: E731
    if cfg['threads']:
        import torch
        torch.set_num_threads(cfg['threads'])
    t_start, cpu_start, load_start = time.time(), cpu_seconds(), os.getloadavg()
    # every step's wall seconds, kept across invocations (a resumed run reports the steps it reused too)
    times_path = os.path.join(out_dir, 'step_seconds.json')
    times = read_json(times_path) or {}
    py = 'python'
    # the evaluations of each stage: (name, [(run, label)], extra eval_ppl.py settings), once per seed.
    # One eval_ppl.py command per model, all on the same spans: --jobs runs them side by side, and a
    # model added later is evaluated alone (finished_evaluation keeps the others)
    zeroshot = [(f'zeroshot_{pe}', [(pe, label(pe))], []) for pe in pes]
    if 'rope' in pes:
        zeroshot += [('zeroshot_rope_yarn4', [('rope', 'RoPE + YaRN x4 (inference only)')],
                      ['--rope_scaling=yarn', '--rope_factor=4']),
                     ('zeroshot_rope_dynntk', [('rope', 'RoPE + dynamic NTK (inference only)')],
                      ['--rope_scaling=dynamic_ntk'])]
    # the fine-tunes: (run name, label, pretrained run, extension)
    finetunes = [(f'{tapa}-ft4x', f'{label(tapa)} (ft 512)', tapa, []),
                 ('rope-ft4x-pi', 'RoPE + PI x4 (ft 512)', 'rope', ['--rope_scaling=pi']),
                 ('rope-ft4x-yarn', 'RoPE + YaRN x4 (ft 512)', 'rope', ['--rope_scaling=yarn']),
                 ('rope-ft4x-abf', f'RoPE + ABF base {cfg["abf_base"]:g} (ft 512)', 'rope',
                  [f'--rope_base={cfg["abf_base"]:g}'])] if cfg['finetune'] else []
    finetuned = [(f'finetuned_{name}', [(name, lab)], []) for name, lab, _, _ in finetunes]
    old_cwd = os.getcwd()
    os.chdir(REPO)  # every command runs from the repository root, as the docs write them
    try:
        # 1. data
        data = []
        if cfg['data_dir']:
            folder = os.path.abspath(os.path.join(old_cwd, cfg['data_dir']))
            data = [f"--data_dir={folder}"]
            if not os.path.exists(os.path.join(folder, 'meta.json')):
                raise ConfigError(f"--data_dir={cfg['data_dir']} holds no prepared data (meta.json)")
        else:
            folder = os.path.join(REPO, 'data', 'pg19', 'byte')
            if not os.path.exists(os.path.join(folder, 'meta.json')):
                if not os.path.isdir(os.path.join(REPO, PG19_MINI)):
                    raise ConfigError(f"no prepared data in data/pg19/byte and no {PG19_MINI} to prepare it from: "
                                      f"download some books (python data/pg19/prepare.py --tokenizer byte "
                                      f"--num_books 50), put PG-19 books in {PG19_MINI} (train/ validation/ test/ "
                                      f"of <id>.txt) or pass --data_dir")
                run_steps([('prepare', [py, 'data/pg19/prepare.py', '--tokenizer', 'byte', '--source', PG19_MINI])],
                          cfg, times, save=times_path)
        check_split(folder, cfg['split'], cfg)
        quick_train = ['--eval_iters=1', '--log_interval=1', '--warmup_iters=1', '--batch_size=4'] if cfg['quick'] else []

        # 2. pretraining at context 128, once per seed
        n = cfg['pretrain_iters']
        pretrain = [(f'pretrain_{pe}-s{sd}', [py, 'train.py', f'configs/tiny_{pe}.py', f'--out_dir={ck(pe, sd)}',
                                               f'--seed={sd}', f'--max_iters={n}', f'--lr_decay_iters={n}']
                     + data + quick_train) for sd in seeds for pe in pes]
        run_steps(skip_finished(pretrain, finished_training, 'with these settings', cfg), cfg, times, save=times_path)

        # 3. zero-shot evaluation, and RoPE with inference-time extension (no fine-tuning): eval_ppl.py's
        # own protocol (spans) on the report's split, every seed's models on the same spans
        common = [f'--lengths={",".join(map(str, Ls))}', f'--max_tokens_per_length={cfg["max_tokens_per_length"]}',
                  f'--split={cfg["split"]}', f'--bootstrap={cfg["bootstrap"]}', '--quiet=True'] + data

        def evaluations(stage):
            return [(f'eval_{name}-s{sd}', [py, 'eval_ppl.py', f'--ckpt={",".join(ck(run, sd) for run, _ in models)}',
                                            f'--labels={",".join(lab for _, lab in models)}', *extra,
                                            f'--out={ev(name, sd)}'] + common)
                    for sd in seeds for name, models, extra in stage]

        def run_evaluations(steps):
            """The eval_ppl.py (and eval_passkey.py) steps, but those already done; an evaluation's
            inputs are recorded as soon as it finishes, for finished_evaluation."""
            steps = skip_finished(steps, lambda argv: finished_evaluation(argv, folder, cfg['split']),
                                  'on the same checkpoints and text', cfg)

            def record(name, argv):
                with open(setting(argv, 'out') + '.inputs.json', 'w') as f:
                    json.dump(evaluation_inputs(argv, folder, cfg['split']), f, indent=1)
            run_steps(steps, cfg, times, done=record, save=times_path)
        run_evaluations(evaluations(zeroshot))

        if cfg['finetune']:
            # 4. fine-tuning to 4x (512): each seed's pretrained model, with the same seed
            m = cfg['finetune_iters']
            quick_ft = ['--warmup_iters=1', f'--eval_interval={m}'] if cfg['quick'] else []
            steps = [(f'finetune_{name}-s{sd}', [py, 'finetune_long.py', 'configs/finetune/tiny.py',
                                                 f'--init_dir={ck(src, sd)}', f'--out_dir={ck(name, sd)}',
                                                 f'--seed={sd}', f'--max_iters={m}'] + extra + quick_ft)
                     for sd in seeds for name, _, src, extra in finetunes]
            steps = skip_finished(steps, finished_finetune, 'from the same pretrained model', cfg)

            def record_finetune(name, argv):  # as soon as it has finished, for finished_finetune
                with open(os.path.join(setting(argv, 'out_dir'), 'finetune.inputs.json'), 'w') as f:
                    json.dump(finetune_record(argv), f, indent=1)
            run_steps(steps, cfg, times, done=record_finetune, save=times_path)

            # 5. evaluation of the fine-tuned models (and 6. passkey retrieval)
            passkey = []
            if cfg['passkey']:
                passkey = [(f'passkey-s{sd}', [py, 'eval_passkey.py', f'--ckpt={",".join(ck(f[0], sd) for f in finetunes)}',
                                               f'--labels={",".join(f[1] for f in finetunes)}',
                                               f'--lengths={",".join(map(str, Ls))}', '--depths=0,0.5,1',
                                               f'--num_trials={cfg["passkey_trials"]}', f'--out={ev("passkey", sd)}',
                                               '--quiet=True']) for sd in seeds]
            run_evaluations(evaluations(finetuned) + passkey)
    finally:
        os.chdir(old_cwd)

    # 7. every seed's evaluations pooled: the tables, JSON, CSV and plot
    wall, cpu = time.time() - t_start, cpu_seconds() - cpu_start
    load_end = os.getloadavg()
    rows, cells, scored = {}, {}, None  # (stage, label) -> the row; its per-seed sums per document
    for stage, evals in (('zero-shot', zeroshot), ('fine-tuned 4x', finetuned)):
        for sd in seeds:
            for name, _, _ in evals:
                models, what = read_eval(os.path.join(out_dir, 'eval', f'{name}-s{sd}.json'))
                if scored is None:
                    scored = what
                elif what['doc_ids'] != scored['doc_ids']:
                    raise StepFailed(f"eval/{name}-s{sd}.json scored documents {what['doc_ids']}, the others "
                                     f"{scored['doc_ids']}: the intervals need the same documents everywhere")
                for mod in models:
                    key = (stage, mod['label'])
                    row = rows.setdefault(key, dict(stage=stage, label=mod['label'], trained=mod['trained'],
                                                    seeds=[], ckpts=[]))
                    row['seeds'].append(sd)
                    row['ckpts'].append(mod['ckpt'])
                    cells.setdefault(key, []).append(mod['cells'])
    # every row's perplexity against the first of its stage (the first of --encodings, or its fine-tune)
    first_of = {}
    for key in rows:
        first_of.setdefault(key[0], key)
    stats = aggregate(cells, Ls, cfg['bootstrap'], against={key: first_of[key[0]] for key in rows})
    for key, row in rows.items():
        row['ppl'] = {L: None if st is None else st['mean'] for L, st in stats[key].items()}
        row['results'] = stats[key]
    zs = [r for r in rows.values() if r['stage'] == 'zero-shot']
    ft = [r for r in rows.values() if r['stage'] != 'zero-shot']
    runs = [f'{pe}-s{sd}' for sd in seeds for pe in pes] + [f'{f[0]}-s{sd}' for sd in seeds for f in finetunes]
    val = {name: last_val_loss(os.path.join(out_dir, 'ckpt', name)) for name in runs}
    n_docs = len(scored['doc_ids'])
    few = (f"Note: {n_docs} documents: the intervals, resampling documents, understate the variance between books "
           f"({FEW_DOCS} or more give them meaning).") if n_docs < FEW_DOCS and cfg['bootstrap'] else ''
    from runtime import machine  # (imports torch: not at start-up)
    hw = machine(cfg['threads'])
    command = 'python experiments/paper_in_miniature.py ' + ' '.join(argv)
    summary = dict(command=command.strip(), settings={k: cfg[k] for k in DEFAULTS}, hardware=hw,
                   wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1), load_average_start=load_start,
                   load_average_end=load_end, step_seconds=times, lengths=Ls, seeds=seeds,
                   evaluation=dict(scored, max_tokens_per_length=cfg['max_tokens_per_length']),
                   bootstrap=dict(resamples=cfg['bootstrap'], documents=n_docs, seed=0, paired=True, note=few),
                   final_val_loss={k: (None if v is None else dict(iter=v[0], val_loss=v[1])) for k, v in val.items()},
                   perplexity=list(rows.values()))
    what = (f"the mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}) [95% interval] (min-max over the seeds)"
            if len(seeds) > 1 else f"one seed ({seeds[0]}) [95% interval]")
    how = (f"{cfg['split'].capitalize()} perplexity per byte with eval_ppl.py's spans protocol: the same "
           f"{cfg['max_tokens_per_length']:,} bytes at every length, in {scored['span']}-byte spans at least "
           f"{max(scored['skip'], max(Ls)):,} bytes into each of {n_docs} {cfg['split']} books "
           f"({scored['too_short']} too short, left out). Each cell: {what}; the interval from a paired "
           f"bootstrap over the books ({cfg['bootstrap']} resamples, the same draws for every seed, length and "
           f"model). Ratios: each seed's perplexity over its own at {Ls[0]}, then the mean.")
    md = ["# The TAPA paper in miniature: perplexity past the trained context", '',
          f"`{summary['command']}`", '',
          f"Hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs, torch {hw['torch']} "
          f"({hw['torch_threads']} threads per command, {cfg['jobs']} command(s) at a time). "
          f"Wall time of this invocation {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min (every step's own "
          f"time, reused ones too, at the end). Load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} "
          f"at the end (above the CPU count means other jobs shared the CPU).", '',
          f"Byte-level models (4 layers, n_embd 128, 4 heads, 0.8M parameters) pretrained {cfg['pretrain_iters']} "
          f"steps of 16 x 128 bytes" + (f"; fine-tuned {cfg['finetune_iters']} steps of 4 x 512 bytes" if finetunes
                                         else '') + f". {how}", '']
    if few:
        md += [few, '']
    def stage_tables(title, stage_rows):
        out = [title, '', ppl_table(stage_rows, Ls, 'mean', len(seeds)), '',
               f'Ratio to {Ls[0]}:', '', ppl_table(stage_rows, Ls, 'ratio', len(seeds)), '']
        if len(stage_rows) > 1:
            out += [f"Difference to {stage_rows[0]['label']} (perplexity, this row's minus its; the mean over seeds "
                    f"[95% paired interval over the books]):", '', ppl_table(stage_rows[1:], Ls, 'diff', len(seeds)), '']
        return out
    md += stage_tables('## Zero-shot (trained at 128)', zs)
    if ft:
        md += stage_tables('## Fine-tuned to 4x (512)', ft)
    md += ['## Final validation loss of each run (nats per byte, at its own context)', '',
           '| run | iter | val loss |', '|---|---:|---:|']
    md += [f"| {k} | {v[0]} | {v[1]:.4f} |" for k, v in val.items() if v is not None]
    if cfg['finetune'] and cfg['passkey']:
        table = passkey_table([os.path.join(out_dir, 'eval', f'passkey-s{sd}.json') for sd in seeds])
        md += ['', f"## Passkey retrieval of the fine-tuned models (accuracy / log-likelihood per digit, the mean "
                   f"over {len(seeds)} seed(s); chance -2.30; {cfg['passkey_trials']} keys x depths 0, 0.5, 1)", '',
               table]
    md += ['', f"## Time per step (wall seconds, each from the invocation that ran it; {sum(times.values()) / 60:.1f} "
               f"min summed)", '', '| step | seconds |', '|---|---:|']
    md += [f"| {k} | {v} |" for k, v in times.items()]
    md += ['', 'Commands: commands.sh; outputs of each: logs/; every evaluation (one per model and seed): eval/.', '']
    write_results(out_dir, md, summary, *csv_table(list(rows.values()), Ls, seeds))
    panels = [('zero-shot: trained at 128, no fine-tuning', zs)] + ([('fine-tuned to 4x (512)', ft)] if ft else [])
    png = plot(panels, Ls, os.path.join(out_dir, 'ppl.png'),
               [(128, 'trained 128')] + ([(512, 'fine-tuned 512')] if ft else []),
               f"{cfg['split']} perplexity per byte (mean, 95% interval)")
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
