"""
A positional-encoding arena: synthetic tasks a small GPT learns on a CPU in minutes, and that tell
the encodings apart past the length they were trained at.

    python arena.py                                  # every encoding, two runs at a time (README.md: time)
    python arena.py --encodings=tapa,rope --seeds=3  # some encodings, three seeds each
    python arena.py --tasks=needle --jobs=1          # one task, one run at a time
    python arena.py --quick                          # tiny settings, seconds: into runs/arena-quick/, never runs/arena/

At the sizes a CPU trains, perplexity differs between encodings by a few percent and passkey
retrieval is 0% for every model, so the question that matters for long contexts (do far tokens stay
attendable past the trained length?) goes unanswered. These tasks answer it. For each task and
encoding a model trains at the training length L (block_size), then is tested at L, 2L, ... 16L
(`lengths`) on rows drawn from one fixed seed, the same rows for every model:

  needle  filler tokens, one key and its value hidden at a depth (0 = the start, 1 = just before the
          question), the key asked for at the end. Exact match: the value; a length x depth grid.
  recall  `pairs` key-value pairs spread through filler, then `queries` of their keys (multi-query
          associative recall). Exact match: each query's value.
  copy    distinct random symbols, a separator, the same symbols again. Exact match: the whole copy;
          also per-token accuracy. Training copies 1..L/2 symbols (so the copy starts at no fixed
          distance); the tests copy as many as fit, up to `symbols`.
  offset  k written in digits, a separator, random tokens: at every token, output the one exactly k
          positions back (the exact-offset skill). Exact match: each such answer. k is drawn from
          1..L/2 in training and at every test length; the column "k > L" draws k from L+1..2L,
          offsets no training row ever asked for. Past L, the answers are also scored apart by
          where they stand: before position L (where training put every answer) and from L on.

Training rows of recall and copy also ask, at each value (symbol) of the context, for the token just
before it: it teaches the model to bind neighbours, without which a model this small sits for
thousands of steps on a plateau (task_recall says why). The tests ask only what the task asks.

Every encoding of model.PE_TABLE runs, in its recommended setting (TAPA: the small-model setting,
tapa_phase_scale=0.05 and tapa_phase='linear', as configs/tiny_tapa_small_linear.py), under one
budget; RoPE also with inference-time extensions (rope_extensions, default YaRN and dynamic NTK:
YaRN, PI and NTK scaled to each test length, factor = length / L; dynamic NTK scales itself).
Learned positions are n/a past L.

The training is train.py's loop (train.train with a batch source and an evaluation hook): the batches
are a pure function of (seed, iteration, micro-step), so checkpoints, the progress bar and an exact
resume are train.py's. Running the same command again carries on: finished runs are not retrained,
an interrupted one resumes from its checkpoint, and each run's evaluation is kept next to it (changed
evaluation settings re-evaluate the checkpoints; changed training settings need another --out).

Outputs, in --out: results.md (tables), results.json, results.csv (one row per measurement),
accuracy.png (accuracy against length, a panel per task), needle.png (the needle heatmaps), and
runs/<task>/<encoding>-seed<n>/ (ckpt.pt, log.jsonl with accuracy at L during training, eval.json).
"""

import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import numpy as np
import torch
from tqdm import tqdm

import train
from configurator import ConfigError, get_overrides
from model import GPT, GPTConfig, PE_TABLE, ROPE_SCALINGS
from runtime import TrainError, check_writable, load_checkpoint, machine, model_from_checkpoint, pick_device

# -----------------------------------------------------------------------------
# the arena's settings (python arena.py --key=value; --quick alone means --quick=True)
out = 'runs/arena'           # everything goes here
quick = False                # tiny settings for every step (a smoke test): into runs/arena-quick
encodings = 'all'            # 'all' = every key of model.PE_TABLE, or a comma list of them
rope_extensions = 'yarn,dynamic_ntk'  # RoPE at inference time: keys of model.ROPE_SCALINGS ('' = none)
tasks = 'needle,recall,copy,offset'   # the tasks, each trained and tested with a model of its own
seeds = 1                    # models per task and encoding: seeds seed, seed+1, ...
lengths = '1,2,4,8,16'       # test lengths, in multiples of the training length L = block_size
jobs = 2                     # runs at the same time, each in a process of its own (2: both cores of a laptop)
threads = 0                  # torch threads per run (0 = torch's default; with jobs > 1: the CPUs / jobs)
dpi = 110                    # of the figures
# the tasks
symbols = 64                 # content tokens: copy and offset use them all; keys the first half, values the rest
fillers = 16                 # filler tokens of needle and recall (never keys or values)
pairs = 6                    # recall: key-value pairs per row
queries = 4                  # recall: queries per row (distinct keys among the pairs)
depths = '0,0.25,0.5,0.75,1'  # needle: where the key-value pair sits, as a fraction of the filler before it
eval_rows = 100              # test rows per task and length (needle: per depth too)
train_eval_rows = 32         # rows for the accuracy at L that each evaluation during training logs
# train.py's settings, with the arena's defaults (the rest are train.py's; pos_encoding, out_dir,
# init_from and the data settings are the arena's business). Chosen from short runs on one CPU core:
# recall and copy need heads that find a token by its content, and the steps until they form grow
# fast with the length (at L = 64 neither formed in 1,500 steps; at L = 32 copy did in 500); with two
# layers recall formed by step 1,000 in 2 of 3 seeds, with three in 4 of 5; TAPA's copy was at 4%
# after 1,000 steps and at 98% after 1,500. 2,000 steps leave a margin.
block_size = 32              # the training length L
n_layer = 3
n_head = 4
n_embd = 64
batch_size = 64
max_iters = 2000             # steps per model (one model per task and encoding)
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
lr_decay_iters = 0           # 0 = max_iters
eval_interval = 250
eval_iters = 4
log_interval = 50
always_save_checkpoint = True  # a checkpoint at every evaluation: an interrupted run loses little
compile = False              # a model this small trains faster than torch.compile compiles it
# -----------------------------------------------------------------------------
ARENA_KEYS = ['out', 'quick', 'encodings', 'rope_extensions', 'tasks', 'seeds', 'lengths', 'jobs', 'threads', 'dpi',
              'symbols', 'fillers', 'pairs', 'queries', 'depths', 'eval_rows', 'train_eval_rows']
TRAIN_CHANGED = ['block_size', 'n_layer', 'n_head', 'n_embd', 'batch_size', 'max_iters', 'learning_rate', 'min_lr',
                 'warmup_iters', 'lr_decay_iters', 'eval_interval', 'eval_iters', 'log_interval',
                 'always_save_checkpoint', 'compile']
# what the arena decides for each run, and the RoPE extensions, which are evaluation's
MANAGED = ['out_dir', 'init_from', 'eval_only', 'pos_encoding', 'dataset', 'tokenizer', 'data_dir',
           'rope_scaling', 'rope_factor', 'rope_original_block_size']
TRAIN_DEFAULTS = {**train.DEFAULTS, **{k: globals()[k] for k in TRAIN_CHANGED}}  # what train.train gets
DEFAULTS = {**{k: globals()[k] for k in ARENA_KEYS},
            **{k: v for k, v in TRAIN_DEFAULTS.items() if k not in MANAGED}}
OPTIONAL_TYPES = {k: v for k, v in train.OPTIONAL_TYPES.items() if k in DEFAULTS}
# --quick's settings, where not given: every step with a model and data that take seconds, in its own
# out folder, so that a smoke test never mixes with (or refuses to run next to) a full run's
QUICK = dict(out='runs/arena-quick', block_size=16, n_layer=1, n_head=2, n_embd=16, batch_size=8, max_iters=2,
             warmup_iters=1, eval_interval=2, eval_iters=1, log_interval=1, lengths='1,2', symbols=16, fillers=4,
             pairs=2, queries=1, depths='0,1', eval_rows=4, train_eval_rows=2, dpi=30, jobs=1)
# each encoding's recommended setting, where the model's defaults are not it
RECOMMENDED = {'tapa': dict(tapa_phase_scale=0.05, tapa_phase='linear')}
# what evaluating a run depends on (anything else that changed needs new training: another --out)
EVAL_KEYS = ['rope_extensions', 'lengths', 'depths', 'eval_rows']
SCORING = 2  # raise it when evaluate_model scores something new: saved evaluations are then redone
NOT_TRAINING = EVAL_KEYS + ['out', 'quick', 'encodings', 'tasks', 'seeds', 'seed', 'jobs', 'threads', 'dpi', 'device',
                            'train_eval_rows', 'log_interval', 'wandb_log', 'wandb_project', 'wandb_run_name']
EVAL_SEED = 2024  # the test rows: the same for every model and seed

# -----------------------------------------------------------------------------
# the vocabulary: a few special tokens, the digits of offset's k, filler tokens, then the symbols

SEP, ASK = 0, 1
TASK_TOKEN = {'needle': 2, 'recall': 3, 'copy': 4, 'offset': 5}  # each row starts with its task's token
TASKS = tuple(TASK_TOKEN)
DIGIT = 6    # 6..15: the digits 0..9
FILLER = 16  # then `fillers` filler tokens, then `symbols` symbols


def vocab_size(cfg):
    return FILLER + cfg['fillers'] + cfg['symbols']


def symbol_ranges(cfg):
    """(first symbol, first value, end): keys are [first symbol, first value), values [first value, end)."""
    first = FILLER + cfg['fillers']
    return first, first + cfg['symbols'] // 2, first + cfg['symbols']


def offset_digits(cfg):
    """offset writes k with this many digits (zero-padded), enough for the largest k ever asked, 2L."""
    return len(str(2 * cfg['block_size']))


# -----------------------------------------------------------------------------
# the tasks: each makes one row of exactly T tokens from a numpy Generator. x are the tokens read; y
# holds at each position the token the model must output there, -1 where nothing is asked (train.py's
# loss ignores those). So a row is a prompt with its answers, and the loss is on the answers only.

def task_needle(T, rng, cfg, depth=None):
    """[needle] filler.. key value filler.. [ask] key -> value at the last position. depth: the fraction
    of the filler before the pair (None: uniform)."""
    n_fill = T - 5
    if n_fill < 0:
        raise ValueError(f"needle needs rows of at least 5 tokens, not {T}")
    first, first_value, end = symbol_ranges(cfg)
    before = rng.integers(0, n_fill + 1) if depth is None else int(round(depth * n_fill))
    key, value = rng.integers(first, first_value), rng.integers(first_value, end)
    fill = FILLER + rng.integers(0, cfg['fillers'], n_fill)
    x = np.concatenate([[TASK_TOKEN['needle']], fill[:before], [key, value], fill[before:], [ASK, key]])
    y = np.full(T, -1)
    y[-1] = value
    return x, y


def task_recall(T, rng, cfg, bind=True):
    """[recall] `pairs` (key value) pairs at random places in filler [sep] q1 .. qQ: at each query q_i (one
    of the keys) its value is asked. Keys are distinct within a row; so are the queried keys.
    bind (training rows): each value in the context is also asked for the key just before it. Finding
    a value by its key takes two heads that only help together (one that copies each key into the
    value after it, one that matches the query against those), and a small model trained on the
    queries alone sits for thousands of steps at the plateau of guessing any value of the row;
    asking for the binding grows the first head directly, and recall is learned in a few hundred
    steps. The tests ask the queries only."""
    n_pairs, n_queries = cfg['pairs'], cfg['queries']
    n_context = T - n_queries - 2  # [recall] context [sep] q1 .. qQ has T tokens
    if n_context < 2 * n_pairs or n_queries > n_pairs:
        raise ValueError(f"recall: {n_pairs} pairs and {n_queries} queries (at most one per pair) need rows of "
                         f"at least {2 * n_pairs + n_queries + 2} tokens, not {T}")
    first, first_value, end = symbol_ranges(cfg)
    if n_pairs > first_value - first:
        raise ValueError(f"recall: {n_pairs} distinct keys per row need symbols >= {2 * n_pairs}")
    keys = first + rng.choice(first_value - first, n_pairs, replace=False)
    values = rng.integers(first_value, end, n_pairs)
    context = FILLER + rng.integers(0, cfg['fillers'], n_context)
    # the context is n_context - n_pairs slots, each a filler token or a pair: pair i takes the slot
    # slot_i, and the i pairs before it have pushed it i tokens right
    where = np.sort(rng.choice(n_context - n_pairs, n_pairs, replace=False)) + np.arange(n_pairs)
    context[where], context[where + 1] = keys, values
    asked = rng.choice(n_pairs, n_queries, replace=False)
    x = np.concatenate([[TASK_TOKEN['recall']], context, [SEP], keys[asked]])
    y = np.full(T, -1)
    y[T - n_queries:] = values[asked]
    if bind:  # training: at each value in the context, its key too (see above)
        y[1 + where + 1] = keys
    return x, y


def task_copy(T, rng, cfg, longest=False, bind=True):
    """[copy] filler.. s1 .. sn [sep] s1 .. s(n-1), distinct symbols: s_i is asked at the separator and at
    each copied token, so the model writes the copy token by token. n is drawn from 1..n_max, n_max =
    the most that fit ((T-1)/2 tokens, and no more than there are symbols); longest: n = n_max (the
    tests). Training's n varies, so the copy starts at no fixed distance: the model must find where
    it is by matching tokens, which works at any length. bind (training rows): each symbol of the
    first s is also asked for the one before it, for the reason recall's are (see task_recall)."""
    n_max = min((T - 1) // 2, cfg['symbols'])
    if n_max < 1:
        raise ValueError(f"copy needs rows of at least 3 tokens, not {T}")
    n = n_max if longest else int(rng.integers(1, n_max + 1))
    first, _, end = symbol_ranges(cfg)
    s = first + rng.choice(end - first, n, replace=False)
    pad = FILLER + rng.integers(0, cfg['fillers'], T - 1 - 2 * n)
    x = np.concatenate([[TASK_TOKEN['copy']], pad, s, [SEP], s[:-1]])
    y = np.full(T, -1)
    y[T - n:] = s
    if bind:
        y[T - 2 * n + 1:T - n] = s[:-1]
    return x, y


def task_offset(T, rng, cfg, k_range=None):
    """[offset] digits of k [sep] s1 .. sm: at each s_j with j > k, the answer is s_(j-k), the token exactly
    k positions back. k_range (low, high), inclusive: by default 1..L/2, as in training."""
    L = cfg['block_size']
    low, high = k_range or (1, L // 2)
    n_digits = offset_digits(cfg)
    m = T - 2 - n_digits
    high = min(high, m - 1)  # at least one answer per row
    if not 1 <= low <= high:
        raise ValueError(f"offset: rows of {T} tokens hold no offset k in {k_range or (1, L // 2)} with an answer")
    k = int(rng.integers(low, high + 1))
    first, _, end = symbol_ranges(cfg)
    s = rng.integers(first, end, m)
    x = np.concatenate([[TASK_TOKEN['offset']], [DIGIT + int(c) for c in str(k).zfill(n_digits)], [SEP], s])
    y = np.full(T, -1)
    y[T - m + k:] = s[:m - k]
    return x, y


TEST_OPTIONS = {'copy': {'longest': True, 'bind': False}, 'recall': {'bind': False}}  # what the tests ask
# the metrics of each test (n/a where a test cannot run)
METRICS = {'copy': ['exact', 'token'], 'offset': ['exact', 'before_L', 'past_L']}
GENERATORS = {'needle': task_needle, 'recall': task_recall, 'copy': task_copy, 'offset': task_offset}


def make_rows(task, T, n, rng, cfg, **options):
    """n rows of one task as (x, y) int64 tensors of shape (n, T)."""
    rows = [GENERATORS[task](T, rng, cfg, **options) for _ in range(n)]
    return tuple(torch.from_numpy(np.stack(part).astype(np.int64)) for part in zip(*rows))


def batch_source(cfg, task, seed):
    """train.py's batch source: rows of one task at the training length. Batch (split, iteration,
    micro_step) is a pure function of them and the seed (a numpy Generator seeded with all four), so a
    resumed run sees exactly the batches it would have seen."""
    def get(split, iteration, micro_step):
        rng = np.random.default_rng([seed, ('train', 'validation').index(split), iteration, micro_step])
        return make_rows(task, cfg['block_size'], cfg['batch_size'], rng, cfg)
    return get


# -----------------------------------------------------------------------------
# accuracy

def accuracy(task, pred, y, split_at=None):
    """Exact match of predictions pred against answers y (both (rows, T); y = -1 where nothing is asked),
    as the task defines it. needle: the value (one per row); recall and offset: each answer; copy: the
    whole copy (per row), and 'token', the fraction of copied tokens right. None where nothing is asked.
    split_at (offset): also 'before_L' and 'past_L', the answers at positions < split_at and >= it."""
    asked = y >= 0
    right = (pred == y) & asked
    n_asked = int(asked.sum())
    if n_asked == 0:
        return {'exact': None, 'token': None} if task == 'copy' else {'exact': None}
    per_answer = int(right.sum()) / n_asked
    if split_at is not None:
        def share(cols):  # the answers asked in these columns that are right, or None if none is asked
            n = int(asked[:, cols].sum())
            return int(right[:, cols].sum()) / n if n else None
        return {'exact': per_answer, 'before_L': share(slice(None, split_at)), 'past_L': share(slice(split_at, None))}
    if task != 'copy':
        return {'exact': per_answer}
    rows = asked.any(dim=1)
    whole = (right.sum(dim=1) == asked.sum(dim=1))[rows]
    return {'exact': whole.float().mean().item(), 'token': per_answer}


@torch.no_grad()
def predict(model, x, device, max_tokens=16384):
    """The model's argmax at every position of rows x (rows, T), a few rows at a time."""
    chunk = max(1, max_tokens // x.size(1))
    out = [model.lm_head(model.hidden(x[i:i + chunk].to(device))).argmax(-1).cpu() for i in range(0, len(x), chunk)]
    return torch.cat(out)


@contextmanager
def rope_extension(model, scaling, T, L):
    """RoPE with an inference-time extension for length T: rope_scaling set, with factor T/L (dynamic
    NTK: 1, it follows the length itself), from the training length L; the config is restored after."""
    cfg = model.config
    saved = (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_block_size)
    cfg.rope_scaling, cfg.rope_original_block_size = scaling, L
    cfg.rope_factor = 1.0 if scaling == 'dynamic_ntk' else max(1.0, T / L)
    try:
        yield
    finally:
        cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_block_size = saved


def held_out_rows(task, T, cfg, **options):
    """The fixed test rows of a task at length T: the same for every model and seed."""
    extra = [int(round(1000 * options['depth']))] if 'depth' in options else list(options.get('k_range', ()))
    rng = np.random.default_rng([EVAL_SEED, TASKS.index(task), T, *extra])
    return make_rows(task, T, cfg['eval_rows'], rng, cfg, **options)


def evaluate_model(model, task, cfg, device, label, run):
    """Every test of a task on its model: records {label, encoding, extension, seed, task, metric,
    length, depth, accuracy} (accuracy None = n/a), and the note of why, if any is n/a."""
    L, records, notes = cfg['block_size'], [], {}
    was_training = model.training
    model.eval()
    if task == 'needle':  # (the name in the results, options)
        tests = [('needle', {'depth': d}) for d in cfg['depth_list']]
    elif task == 'offset':
        tests = [('offset', {}), ('offset_far', {'k_range': (L + 1, 2 * L)})]
    else:
        tests = [(task, TEST_OPTIONS.get(task, {}))]
    try:
        for T in cfg['length_list']:
            for name, options in tests:
                try:
                    x, y = held_out_rows(task, T, cfg, **options)
                except ValueError:  # e.g. offsets > L at length L: no such row
                    scores = dict.fromkeys(METRICS.get(name, ['exact']))
                else:
                    try:
                        scores = accuracy(task, predict(model, x, device), y, L if name == 'offset' else None)
                    except ValueError as e:  # an encoding that cannot run at this length (learned past L)
                        if T <= L:
                            raise
                        notes[label] = f"n/a past {L}: {e}"
                        scores = dict.fromkeys(METRICS.get(name, ['exact']))
                for metric, value in scores.items():
                    records.append({**run, 'label': label, 'task': name, 'metric': metric, 'length': T,
                                    'depth': options.get('depth'), 'accuracy': value})
        # needle: also the mean over depths, the number its tables show
        for T in cfg['length_list']:
            cells = [r['accuracy'] for r in records if r['task'] == 'needle' and r['length'] == T]
            if cells:
                records.append({**run, 'label': label, 'task': 'needle', 'metric': 'exact', 'length': T,
                                'depth': None, 'accuracy': None if None in cells else sum(cells) / len(cells)})
    finally:
        model.train(was_training)
    return records, notes


def training_hook(cfg, task, device):
    """train.py's evaluation hook: exact match at the training length on a few fixed rows, logged in
    log.jsonl as 'accuracy' (a learning curve; the full tests come after training)."""
    rng = np.random.default_rng([EVAL_SEED + 1, TASKS.index(task)])
    x, y = make_rows(task, cfg['block_size'], cfg['train_eval_rows'], rng, cfg, **TEST_OPTIONS.get(task, {}))

    def hook(model):
        model.eval()
        value = round(accuracy(task, predict(model, x, device), y)['exact'], 4)
        model.train()
        tqdm.write(f"  {task}: exact match at L {value:.2f}")
        return {'accuracy': value}
    return hook


# -----------------------------------------------------------------------------
# settings


def parse_list(key, text, kind, allowed=None):
    items = [t.strip() for t in str(text).split(',') if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ConfigError(f"{key}={text!r} must be a comma list of {kind.__name__} values") from None
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad:
        raise ConfigError(f"{key}={text!r}: {bad[0]!r} is not one of {', '.join(map(str, allowed))}")
    return values


def resolve(argv):
    """The settings from the command line (with --quick's), checked; derived lists under *_list keys."""
    argv = ['--quick=True' if a == '--quick' else a for a in argv]
    given = get_overrides(DEFAULTS, argv, OPTIONAL_TYPES, doc=__doc__)  # -h: usage and settings
    cfg = {**DEFAULTS, **given}
    if cfg['quick']:
        cfg.update({k: v for k, v in QUICK.items() if k not in given})
        if os.path.abspath(cfg['out']) == os.path.abspath(DEFAULTS['out']):
            raise ConfigError(f"--quick --out={cfg['out']}: that is where the full run keeps its results and "
                              f"checkpoints; a quick run goes elsewhere (default {QUICK['out']})")
    pes = list(PE_TABLE) if cfg['encodings'] == 'all' else parse_list('encodings', cfg['encodings'], str, PE_TABLE)
    cfg['pe_list'] = pes
    cfg['extension_list'] = parse_list('rope_extensions', cfg['rope_extensions'], str, ROPE_SCALINGS) \
        if 'rope' in pes else []
    cfg['task_list'] = parse_list('tasks', cfg['tasks'], str, TASKS)
    multiples = parse_list('lengths', cfg['lengths'], int)
    if not multiples or any(m < 1 for m in multiples) or multiples != sorted(set(multiples)):
        raise ConfigError(f"lengths={cfg['lengths']!r} must be increasing whole multiples >= 1 of the training "
                          f"length (1 = block_size itself), e.g. 1,2,4,8,16")
    cfg['length_list'] = [m * cfg['block_size'] for m in multiples]
    cfg['depth_list'] = parse_list('depths', cfg['depths'], float)
    if not cfg['depth_list'] or not all(0 <= d <= 1 for d in cfg['depth_list']):
        raise ConfigError(f"depths={cfg['depths']!r} must be fractions within [0, 1] (0: the start, 1: the end)")
    for key in ('seeds', 'symbols', 'fillers', 'pairs', 'queries', 'eval_rows', 'train_eval_rows', 'jobs', 'dpi'):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is too small (it must be at least 1)")
    if cfg['threads'] < 0:
        raise ConfigError(f"threads={cfg['threads']} must be 0 (torch's default) or more")
    if cfg['symbols'] < 2:
        raise ConfigError(f"symbols={cfg['symbols']} must be at least 2 (keys are half of them, values the rest)")
    if not cfg['task_list']:
        raise ConfigError("tasks='' names no task: pass some of needle,recall,copy,offset")
    for task in cfg['task_list']:  # every task must fit the training length (the generators say why not)
        try:
            GENERATORS[task](cfg['block_size'], np.random.default_rng(0), cfg)
        except ValueError as e:
            raise ConfigError(f"block_size={cfg['block_size']}: {e}") from None
    if not cfg['lr_decay_iters']:
        cfg['lr_decay_iters'] = max(cfg['max_iters'], cfg['warmup_iters'] + 1)
    return cfg, given


def run_settings(cfg, task, pe, seed, given):
    """train.train's settings for one task, encoding and seed: the arena's, the encoding's recommended
    setting (unless given on the command line), and the run's own folder."""
    run = {k: cfg.get(k, default) for k, default in TRAIN_DEFAULTS.items()}
    run.update({k: v for k, v in RECOMMENDED.get(pe, {}).items() if k not in given})
    run.update(pos_encoding=pe, seed=seed, out_dir=run_dir(cfg, task, pe, seed))
    return run


def run_dir(cfg, task, pe, seed):
    return os.path.join(cfg['out'], 'runs', task, f'{pe}-seed{seed}')


def check_out(cfg):
    """An out folder holds runs of one set of training settings: another set needs another folder."""
    path = os.path.join(cfg['out'], 'settings.json')
    mine = {k: cfg[k] for k in DEFAULTS if k not in NOT_TRAINING}
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        differ = [f"{k}={mine.get(k)!r} (it has {theirs.get(k)!r})" for k in sorted(set(mine) | set(theirs))
                  if mine.get(k) != theirs.get(k)]
        if differ:
            raise ConfigError(f"{cfg['out']} holds runs trained with other settings: {', '.join(differ)}. "
                              f"Pass another --out (or delete {cfg['out']})")
    check_writable(os.path.join(cfg['out'], 'settings.json'))
    with open(path, 'w') as f:
        json.dump(mine, f, indent=1)


# -----------------------------------------------------------------------------
# the runs


def train_or_load(cfg, task, pe, seed, given, device):
    """The trained model of one task, encoding and seed: trained now, resumed from its checkpoint, or
    (a finished run) loaded. Returns (model, training wall seconds from its log)."""
    folder = run_dir(cfg, task, pe, seed)
    ckpt_path = os.path.join(folder, 'ckpt.pt')
    run = run_settings(cfg, task, pe, seed, given)
    checkpoint = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if checkpoint is not None and checkpoint['iter_num'] >= cfg['max_iters']:
        model = model_from_checkpoint(checkpoint).to(device)
    else:
        hook, source = training_hook(cfg, task, device), batch_source(cfg, task, seed)
        if checkpoint is not None:
            result = train.train({**run, 'init_from': 'resume'}, defaults=TRAIN_DEFAULTS,
                                 optional_types=train.OPTIONAL_TYPES, batch_source=source, evaluate=hook)
        else:
            torch.manual_seed(seed)  # the initial weights: train.train seeds after the model exists
            model = GPT(GPTConfig(**{k: run[k] for k in train.MODEL_KEYS}, vocab_size=vocab_size(cfg)))
            result = train.train(run, model=model, defaults=TRAIN_DEFAULTS, optional_types=train.OPTIONAL_TYPES,
                                 batch_source=source, evaluate=hook)
        model = result['model']
    elapsed = None
    with open(os.path.join(folder, 'log.jsonl')) as f:
        for line in f:
            elapsed = json.loads(line).get('elapsed_s', elapsed)
    return model, elapsed


def evaluate_run(cfg, model, task, pe, seed, device):
    """The run's records: from its eval.json when made with these evaluation settings, else measured now."""
    path = os.path.join(run_dir(cfg, task, pe, seed), 'eval.json')
    key = {**{k: cfg[k] for k in EVAL_KEYS}, 'scoring': SCORING}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved['settings'] == key:
            return saved['records'], saved['notes'], saved['seconds']
    t0 = time.time()
    run = {'encoding': pe, 'extension': None, 'seed': seed}
    records, notes = evaluate_model(model, task, cfg, device, pe, run)
    if pe == 'rope':
        for scaling in cfg['extension_list']:
            label = f'rope+{scaling}'
            for T in cfg['length_list']:
                with rope_extension(model, scaling, T, cfg['block_size']):
                    part, _ = evaluate_model(model, task, {**cfg, 'length_list': [T]}, device, label,
                                             {**run, 'extension': scaling})
                records += part
    seconds = round(time.time() - t0, 1)
    with open(path, 'w') as f:
        json.dump({'settings': key, 'records': records, 'notes': notes, 'seconds': seconds}, f)
    return records, notes, seconds


# -----------------------------------------------------------------------------
# results

TITLES = [('needle', 'exact', 'needle: the value (mean over depths)'),
          ('recall', 'exact', 'recall: each query\'s value'),
          ('copy', 'exact', 'copy: the whole copy'),
          ('copy', 'token', 'copy: per token'),
          ('offset', 'exact', 'offset: the token k back, k in 1..L/2'),
          ('offset', 'before_L', 'offset: its answers before position L'),
          ('offset', 'past_L', 'offset: its answers from position L on'),
          ('offset_far', 'exact', 'offset: k > L (offsets never trained)')]
# the summary table at the top of results.md (the README's): (task, metric, test length as a multiple of L)
SUMMARY = [('needle', 'exact', 1), ('needle', 'exact', 4), ('needle', 'exact', 16),
           ('recall', 'exact', 1), ('recall', 'exact', 4), ('recall', 'exact', 16),
           ('copy', 'exact', 1), ('copy', 'token', 2), ('offset', 'exact', 1), ('offset', 'exact', 4),
           ('offset', 'before_L', 4), ('offset', 'past_L', 4), ('offset_far', 'exact', 2)]


def seed_table(records):
    """{(label, task, metric, length, depth): [accuracy of each seed]}, in the records' order of labels."""
    cells = {}
    for r in records:
        cells.setdefault((r['label'], r['task'], r['metric'], r['length'], r['depth']), []).append(r['accuracy'])
    return cells


def mean_table(records):
    """{(label, task, metric, length, depth): mean accuracy over seeds (None if any seed is n/a)}."""
    return {k: (None if None in v else sum(v) / len(v)) for k, v in seed_table(records).items()}


def fmt(v):
    return 'n/a' if v is None else f'{100 * v:.0f}'


def cell(values):
    """A table cell: the mean over seeds in %, with the seeds' min-max where they differ."""
    if values is None or None in values:
        return 'n/a'
    mean, low, high = fmt(sum(values) / len(values)), fmt(min(values)), fmt(max(values))
    return mean if low == high else f'{mean} ({low}-{high})'


def markdown(cfg, records, labels, notes, summary):
    L, Ls = cfg['block_size'], cfg['length_list']
    seeds = seed_table(records)
    spread = '; in brackets the lowest and highest seed, where they differ' if cfg['seeds'] > 1 else ''
    md = ['# Positional-encoding arena', '', f"`{summary['command']}`", '',
          f"Exact match in % (mean of {cfg['seeds']} seed(s){spread}), {cfg['eval_rows']} test rows per task and length "
          f"(needle: per depth). One model per task and encoding, trained at L = {L} tokens, {cfg['max_iters']} "
          f"steps of {cfg['batch_size']} rows; {cfg['n_layer']} layers, n_embd {cfg['n_embd']}, "
          f"{cfg['n_head']} heads; vocabulary {vocab_size(cfg)} ({cfg['symbols']} symbols, {cfg['fillers']} fillers). "
          f"TAPA in the small-model setting (tapa_phase_scale 0.05, linear phase); rope+<method>: the RoPE model "
          f"with an inference-time extension (factor = length / L; dynamic NTK scales itself). n/a: not measurable "
          f"there.", '',
          f"Hardware: {summary['hardware']['cpu']}, {summary['hardware']['logical_cpus']} logical CPUs, torch "
          f"{summary['hardware']['torch']}, {summary['hardware']['torch_threads']} thread(s) per run, {cfg['jobs']} "
          f"run(s) at a time. Wall time "
          f"{summary['wall_seconds'] / 60:.1f} min (training and evaluation of this invocation; runs already "
          f"done were read back).", '']
    columns = [(task, metric, m * L) for task, metric, m in SUMMARY
               if task.split('_')[0] in cfg['task_list'] and m * L in Ls]
    if columns:  # a few columns of the tables below, side by side
        name = {'exact': '', 'token': ' per token', 'before_L': ' before L', 'past_L': ' past L'}
        md += ['## Summary', '', '| model | ' + ' | '.join(
                   f"{'offset k > L' if task == 'offset_far' else task}{name[metric]} {T // L}L"
                   for task, metric, T in columns) + ' |', '|---|' + '---:|' * len(columns)]
        md += [f"| {label} | " + ' | '.join(cell(seeds.get((label, task, metric, T, None)))
                                             for task, metric, T in columns) + ' |' for label in labels]
        md.append('')
    for task, metric, title in TITLES:
        if task.split('_')[0] not in cfg['task_list']:
            continue
        md += [f'## {title}', '', '| model | ' + ' | '.join(f'{T} ({T // L}L)' for T in Ls) + ' |',
               '|---|' + '---:|' * len(Ls)]
        md += [f"| {label} | " + ' | '.join(cell(seeds.get((label, task, metric, T, None))) for T in Ls) + ' |'
               for label in labels]
        md.append('')
    if 'needle' in cfg['task_list']:
        d0 = cfg['depth_list'][0]
        md += [f'## needle at depth {d0:g} (the pair farthest from the question); every depth: needle.png, results.csv',
               '', '| model | ' + ' | '.join(f'{T}' for T in Ls) + ' |', '|---|' + '---:|' * len(Ls)]
        md += [f"| {label} | " + ' | '.join(cell(seeds.get((label, 'needle', 'exact', T, d0))) for T in Ls) + ' |'
               for label in labels]
        md.append('')
    short = []  # the models that have not learned a task even at the length they were trained at
    for label in labels:
        for task in ('needle', 'recall', 'copy'):
            values = seeds.get((label, task, 'exact', L, None))
            if values is not None and None not in values and min(values) < 0.95:  # the mean, or any one seed
                short.append(f"{label} {task} {cell(values)}%")
    md += ['## At the training length', '',
           ('Below 95% at L on needle, recall or copy (in some seed): ' + '; '.join(short) + '.') if short else
           'Every model reaches 95% at L on needle, recall and copy, in every seed.', '']
    if notes:
        md += ['Notes: ' + '; '.join(f'{k}: {v}' for k, v in notes.items()), '']
    md += ['## Time per run (wall seconds)', '', '| run | training | evaluation |', '|---|---:|---:|']
    md += [f"| {k} | {v['train_seconds']} | {v['eval_seconds']} |" for k, v in summary['runs'].items()]
    md += ['', 'Every run: runs/<task>/<encoding>-seed<n>/ (ckpt.pt, log.jsonl, eval.json).', '']
    return '\n'.join(md)


def plot(cfg, records, labels, out_dir):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plots (pip install matplotlib)")
        return []
    mean, Ls, L = mean_table(records), cfg['length_list'], cfg['block_size']
    panels = [t for t in TITLES if t[0].split('_')[0] in cfg['task_list']]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (task, metric, title) in zip(axes.flat, panels):
        for label in labels:
            xs = [T for T in Ls if mean.get((label, task, metric, T, None)) is not None]
            if xs:
                ax.plot(xs, [100 * mean[(label, task, metric, T, None)] for T in xs], marker='o', label=label,
                        linestyle='--' if '+' in label else '-')
        ax.set_xscale('log', base=2)
        ax.set_xticks(Ls, [f'{T // L}L' for T in Ls])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f'test length (L = {L})')
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    axes[0][0].set_ylabel('exact match (%)')
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [os.path.join(out_dir, 'accuracy.png')]
    fig.savefig(paths[0], dpi=cfg['dpi'])
    plt.close(fig)
    if 'needle' in cfg['task_list']:
        ds = cfg['depth_list']
        cols = min(4, len(labels))
        rows = -(-len(labels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, label in zip(axes.flat, labels):
            grid = np.array([[np.nan if mean.get((label, 'needle', 'exact', T, d)) is None
                              else 100 * mean[(label, 'needle', 'exact', T, d)] for T in Ls] for d in ds])
            ax.imshow(grid, vmin=0, vmax=100, cmap='RdYlGn', aspect='auto')
            for i in range(len(ds)):
                for j in range(len(Ls)):
                    ax.text(j, i, 'n/a' if np.isnan(grid[i, j]) else f'{grid[i, j]:.0f}', ha='center',
                            va='center', fontsize=7)
            ax.set_xticks(range(len(Ls)), [f'{T // L}L' for T in Ls], fontsize=7)
            ax.set_yticks(range(len(ds)), [f'{d:g}' for d in ds], fontsize=7)
            ax.set_title(label, fontsize=9)
        for ax in axes.flat[len(labels):]:
            ax.axis('off')
        for ax in axes[:, 0]:
            ax.set_ylabel('depth', fontsize=8)
        fig.suptitle('needle: exact match (%) by test length and depth (0 = the start of the row)', fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, 'needle.png'))
        fig.savefig(paths[1], dpi=cfg['dpi'])
        plt.close(fig)
    return paths


def run_job(cfg, given, task, pe, seed, quiet=False):
    """Train (or resume, or load) and evaluate one model. quiet (a worker process of --jobs): its output
    goes to output.log in the run's folder. Returns (records, notes, times)."""
    if quiet:
        folder = run_dir(cfg, task, pe, seed)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'output.log'), 'a') as f, redirect_stdout(f), redirect_stderr(f):
            return run_job(cfg, given, task, pe, seed)
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    device = pick_device(cfg['device'])
    model, train_seconds = train_or_load(cfg, task, pe, seed, given, device)
    records, notes, eval_seconds = evaluate_run(cfg, model, task, pe, seed, device)
    return records, notes, {'train_seconds': train_seconds, 'eval_seconds': eval_seconds}


def main(argv):
    cfg, given = resolve(argv)
    check_out(cfg)
    t_start = time.time()
    jobs = [(task, pe, cfg['seed'] + i) for i in range(cfg['seeds']) for pe in cfg['pe_list']
            for task in cfg['task_list']]
    done = {}

    def report(job, result):
        done[job] = result
        (task, pe, seed), records = job, result[0]
        at_L = [r for r in records if r['length'] == cfg['block_size'] and r['depth'] is None
                and r['task'] == task and r['metric'] == 'exact' and r['extension'] is None]
        print(f"[{len(done)}/{len(jobs)}] {task}, {pe}, seed {seed}: exact match at L {fmt(at_L[0]['accuracy'])}% "
              f"(training {result[2]['train_seconds']} s, evaluation {result[2]['eval_seconds']} s)", flush=True)
    if cfg['jobs'] > 1:  # independent runs in worker processes, each on its share of the CPU threads
        if not cfg['threads']:
            cfg['threads'] = max(1, (os.cpu_count() or 1) // cfg['jobs'])
        print(f"{len(jobs)} runs, {cfg['jobs']} at a time, {cfg['threads']} thread(s) each; each run's output: "
              f"output.log in its folder", flush=True)
        pool = ProcessPoolExecutor(cfg['jobs'], mp_context=multiprocessing.get_context('spawn'))
        try:
            futures = {pool.submit(run_job, cfg, given, *job, quiet=True): job for job in jobs}
            for future in as_completed(futures):
                report(futures[future], future.result())
        except BaseException:  # Ctrl-C or a failed run: start no other (what ran is kept: run again to go on)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    else:
        for job in jobs:
            print(f"{job[0]}, {job[1]}, seed {job[2]}: {run_dir(cfg, *job)}", flush=True)
            report(job, run_job(cfg, given, *job))
    records, notes, runs = [], {}, {}
    for job in jobs:  # in the order of the job list, whatever order they finished in
        part, part_notes, times = done[job]
        records += part
        notes.update(part_notes)
        runs['{}/{}-seed{}'.format(*job)] = times
    labels = list(dict.fromkeys(r['label'] for r in records))
    wall = time.time() - t_start
    command = ('python arena.py ' + ' '.join(argv)).strip()
    summary = dict(command=command, settings={k: cfg[k] for k in DEFAULTS}, hardware=machine(cfg['threads']),
                   wall_seconds=round(wall, 1), lengths=cfg['length_list'], labels=labels, runs=runs,
                   notes=notes, records=records)
    out_dir = cfg['out']
    md = markdown(cfg, records, labels, notes, summary)
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write(md)
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(summary, f, indent=1)
        f.write('\n')
    fields = ['label', 'encoding', 'extension', 'seed', 'task', 'metric', 'length', 'depth', 'accuracy']
    with open(os.path.join(out_dir, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: ('' if r[k] is None else r[k]) for k in fields} for r in records)
    pngs = plot(cfg, records, labels, out_dir)
    print()
    print(md)
    print(f"wrote {out_dir}/results.md, results.json, results.csv"
          + ''.join(f", {os.path.basename(p)}" for p in pngs))
    return summary


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # train.train says what there is to continue from
        sys.exit(f"\n{e or 'interrupted'}: run the same command again to carry on")
