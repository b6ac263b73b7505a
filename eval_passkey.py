"""
Passkey retrieval: can a model fetch a number it read thousands of tokens ago? Perplexity averages
over every token and is dominated by the local ones; this test asks for one long-range lookup,
at a chosen distance, and so shows where a positional encoding stops being able to reach back.

    python eval_passkey.py --ckpt=out-tapa,out-rope
    python eval_passkey.py --ckpt=out-tapa --lengths=256,1024,4096 --depths=0,0.5,1 --num_trials=20
    python eval_passkey.py --ckpt=out-rope --rope_scaling=yarn --rope_factor=16 --filler=data

The prompt, exactly L tokens (the test of Mohtashami & Jaggi 2023, "Landmark Attention", also
used by YaRN):

    ...filler... The pass key is 12345. Remember it. 12345 is the pass key. ...filler... What is the pass key? The pass key is

The filler is "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back
again." repeated (--filler=repeat), or a stretch of real text from a document of the split
(--filler=data). The key line sits at depth d: a fraction d of the filler comes before it (d=0: it
opens the prompt, d=1: it comes right before the question), moved to the nearest sentence end so it
never splits a sentence. The filler is cut at its start (the prompt may open mid-sentence) so that
the prompt is exactly L tokens; its end is always a sentence end.

Two scores for each length and depth, over --num_trials random keys (seeded, the same keys for
every checkpoint):
  accuracy      greedy decoding (temperature 0, with a KV cache) of key_digits+2 tokens is right
                when the first run of digits it writes is exactly the key.
  loglik/digit  log p(" 12345" | prompt) / key_digits, teacher-forced (the leading space is part
                of the answer: GPT-2's BPE merges it into the first digits). Guessing digits
                uniformly gives ln(1/10) = -2.303 nats per digit; a perfect copy gets 0. It moves
                long before accuracy does, so it says something even about small models, which
                copy the digits that followed "The pass key is" earlier (induction heads).
The distance reported is the number of tokens from the start of the key line to the end of the
prompt: how far back the model has to look.

Output: markdown tables on stdout (and <out>.md), every trial in <out>.json (--out prefix, default
<first out_dir>/passkey). Overrides as in eval_ppl.py: --rope_scaling, --rope_factor, --rope_base,
--attn_impl. Learned position embeddings report n/a where prompt + answer exceed their block_size.
"""

import json
import os
import random
import re
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import fast_attention
from eval_ppl import (autocast_for, dyadic_lengths, load_models, make_labels, parse_config, parse_lengths,
                      pick_device, resolve_ckpt_path, train_data_dir)
from tokenizer import get_tokenizer
from runtime import TrainError, check_writable

# -----------------------------------------------------------------------------
# default config values, overridden by a config file and/or --key=value on the command line
ckpt = 'out'                 # out_dir(s) or ckpt.pt path(s), comma-separated
labels = ''                  # optional comma-separated row labels, one per checkpoint
lengths = ''                 # comma-separated prompt lengths; '' = dyadic, half the trained length .. max_factor x it
max_factor = 16
depths = '0,0.25,0.5,0.75,1'  # where the key line sits, as a fraction of the filler before it
num_trials = 5               # random keys per (length, depth)
key_digits = 5
filler = 'repeat'            # 'repeat' (the grass is green...) or 'data' (real text from --split)
data_dir = ''                # for filler=data; default data/<dataset>/<tokenizer> from the checkpoint
split = 'validation'
tokenizer = ''               # default: the checkpoint's train config
seed = 1337
batch_size = 8               # prompts per forward pass
out = ''                     # output prefix; '' = <first out_dir>/passkey -> passkey.json, passkey.md
device = 'auto'
dtype = 'auto'
attn_impl = 'auto'
rope_scaling = 'keep'        # inference-time RoPE extension, as in eval_ppl.py
rope_factor = 0.0
rope_base = 0.0
quiet = False
# -----------------------------------------------------------------------------


def default_config():
    g = globals()
    return {k: g[k] for k in ('ckpt', 'labels', 'lengths', 'max_factor', 'depths', 'num_trials', 'key_digits',
                              'filler', 'data_dir', 'split', 'tokenizer', 'seed', 'batch_size', 'out', 'device',
                              'dtype', 'attn_impl', 'rope_scaling', 'rope_factor', 'rope_base', 'quiet')}


FILLER_SENTENCES = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again."]
QUESTION = " What is the pass key? The pass key is"


def key_line(key):
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def random_key(rng, digits):
    """A key of exactly `digits` digits (no leading zero, so it reads as one number)."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


# -----------------------------------------------------------------------------
# prompts


def repeat_filler(tok, n):
    """Exactly n tokens of the repeated filler sentences, ending with a whole sentence, and the
    positions where a sentence ends (0 and n included). Each sentence is tokenized with its leading
    space, which is how it tokenizes inside running text."""
    pieces = [tok.encode(' ' + s) for s in FILLER_SENTENCES]
    ids, breaks, i = [], [0], 0
    while len(ids) < n:
        ids += pieces[i % len(pieces)]
        breaks.append(len(ids))
        i += 1
    cut = len(ids) - n  # drop tokens at the start, so the filler ends with a whole sentence
    return ids[cut:], sorted({b - cut for b in breaks if b >= cut} | {0, n})


def data_filler(tok, tokens, offsets, n, rng):
    """n consecutive tokens from inside one document of a prepared split (picked with rng among the
    documents long enough), and the positions after tokens that end a sentence or a line."""
    lengths = np.diff(offsets) - 1  # without the trailing EOT
    long_enough = np.nonzero(lengths >= n)[0]
    if not len(long_enough):
        raise ValueError(f"filler=data needs a document of {n} tokens; none in this split is that long "
                         f"(use --filler=repeat or shorter --lengths)")
    d = int(long_enough[rng.randrange(len(long_enough))])
    start = int(offsets[d]) + rng.randrange(int(lengths[d]) - n + 1)
    ids = [int(t) for t in tokens[start:start + n]]
    breaks = {0, n}
    for i, t in enumerate(ids):
        text = tok.decode([t])
        if '\n' in text or text.rstrip().endswith(('.', '!', '?')):
            breaks.add(i + 1)
    return ids, sorted(breaks)


class PromptTooShort(ValueError):
    pass


def passkey_prompt(tok, L, depth, key, filler='repeat', data=None, rng=None):
    """The prompt of exactly L tokens with `key` at `depth`. Returns dict(ids, answer, key_pos,
    distance, n_filler): answer = the tokens of " <key>", key_pos = the index of the key line's first
    token in ids, distance = L - key_pos."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be within [0, 1] (a fraction of the context)")
    key_ids, question_ids = tok.encode(key_line(key)), tok.encode(QUESTION)
    n_filler = L - len(key_ids) - len(question_ids)
    if n_filler < 0:
        raise PromptTooShort(f"L={L} is too short: the key line and the question alone take "
                         f"{len(key_ids) + len(question_ids)} {tok.name} tokens")
    if filler == 'repeat':
        filler_ids, breaks = repeat_filler(tok, n_filler)
    elif filler == 'data':
        if data is None or rng is None:
            raise ValueError("filler='data' needs data=(tokens, offsets) and an rng")
        filler_ids, breaks = data_filler(tok, data[0], data[1], n_filler, rng)
    else:
        raise ValueError(f"filler={filler!r}: use 'repeat' or 'data'")
    target = depth * n_filler
    pos = min(breaks, key=lambda b: (abs(b - target), b))  # the sentence end nearest the asked depth
    ids = filler_ids[:pos] + key_ids + filler_ids[pos:] + question_ids
    assert len(ids) == L
    return dict(ids=ids, answer=tok.encode(' ' + key), key_pos=pos, distance=L - pos, n_filler=n_filler)


def first_number(text):
    """The run of digits the model wrote first (after optional whitespace), or '' if it began otherwise."""
    m = re.match(r'\s*(\d+)', text)
    return m.group(1) if m else ''


# -----------------------------------------------------------------------------
# the model side


@torch.no_grad()
def answer_and_score(model, prompts, answers, n_new, autocast):
    """For equal-length prompts (lists of token ids) and the true answers (lists of ids): the greedy
    continuation of n_new tokens of each prompt, and log p(answer | prompt) of each. The prompt is
    run once; its KV cache then serves both the teacher-forced answer and the greedy decoding."""
    dev = next(model.parameters()).device
    idx = torch.tensor(prompts, dtype=torch.long, device=dev)
    cache = model.new_kv_cache()
    with autocast:
        h = model.hidden(idx, kv_cache=cache)
        first = model.lm_head(h[:, -1, :]).float()  # (B, vocab): the next token after each prompt
    # log-likelihood of the true answer, one prompt at a time (answers may differ in length).
    # A layer's cache is a dict whose tensors are replaced (torch.cat), never changed in place, so
    # slicing or shallow-copying it leaves the prompt's cache intact for the next use.
    logliks = []
    for b, ans in enumerate(answers):
        logp = F.log_softmax(first[b], dim=-1)[ans[0]].item()
        if len(ans) > 1:
            row_cache = [{'k': c['k'][b:b + 1], 'v': c['v'][b:b + 1]} for c in cache]
            with autocast:
                hh = model.hidden(torch.tensor([ans[:-1]], device=dev), kv_cache=row_cache)
                logits = model.lm_head(hh[0]).float()
            logp += F.log_softmax(logits, dim=-1).gather(1, torch.tensor(ans[1:], device=dev)[:, None]).sum().item()
        logliks.append(logp)
    # greedy decoding, all prompts together
    gen_cache = [dict(c) for c in cache]
    nxt = first.argmax(dim=-1, keepdim=True)
    generated = [nxt]
    for _ in range(n_new - 1):
        with autocast:
            hh = model.hidden(nxt, kv_cache=gen_cache)
            nxt = model.lm_head(hh[:, -1, :]).float().argmax(dim=-1, keepdim=True)
        generated.append(nxt)
    return torch.cat(generated, dim=1).tolist(), logliks


def tokenizer_name(m, explicit=''):
    """The tokenizer a checkpoint was trained with: its train config, else --tokenizer, else a guess
    from the vocab size. A --tokenizer that contradicts the checkpoint is an error: the other
    tokenizer's ids either index past the model's embeddings or, silently, mean other text."""
    name = m['train_config'].get('tokenizer')
    vocab = m['model'].config.vocab_size
    if explicit and name and explicit != name:
        raise ValueError(f"--tokenizer={explicit}, but {m['path']} was trained with the {name} tokenizer "
                         f"(drop --tokenizer: it is read from the checkpoint)")
    if explicit == 'gpt2' and vocab < 50257:
        raise ValueError(f"--tokenizer=gpt2, but {m['path']} has only {vocab} token embeddings, fewer than "
                         f"GPT-2's 50257 tokens: use --tokenizer=byte")
    if explicit or name:
        return explicit or name
    if vocab == 256:
        return 'byte'
    if vocab >= 50257:
        return 'gpt2'
    raise ValueError(f"{m['path']} does not record its tokenizer; pass --tokenizer=byte or --tokenizer=gpt2")


def make_trials(tok, L, depth, config, data=None):
    """The num_trials prompts of one (length, depth). Each trial has its own rng, seeded by a string
    (hashed deterministically): the same keys and filler in every run and for every checkpoint."""
    trials = []
    for t in range(config['num_trials']):
        rng = random.Random(f"{config['seed']}:{L}:{depth}:{t}")
        key = random_key(rng, config['key_digits'])
        trials.append(dict(key=key, **passkey_prompt(tok, L, depth, key, config['filler'], data, rng)))
    return trials


# -----------------------------------------------------------------------------
# output


def markdown_tables(results):
    Ls, ds = results['lengths'], results['depths']

    def cell(r, what):
        if r is None:
            return 'n/a'
        return f"{100 * r['accuracy']:.0f}%" if what == 'acc' else f"{r['loglik_per_digit']:.2f}"

    lines = [f"Passkey retrieval, {results['num_trials']} trials per cell, filler={results['filler']}. "
             f"Accuracy (greedy exact match), mean over depths:", '',
             '| model | trained | ' + ' | '.join(map(str, Ls)) + ' |', '|---|---:|' + '---:|' * len(Ls)]
    for m in results['models']:
        row = []
        for L in Ls:
            rs = [m['results'][str(L)][str(d)] for d in ds]
            row.append('n/a' if rs[0] is None else f"{100 * sum(r['accuracy'] for r in rs) / len(rs):.0f}%")
        lines.append(f"| {m['label']} | {m['trained_block_size']} | " + ' | '.join(row) + ' |')
    for m in results['models']:
        for L, note in m['notes'].items():
            lines.append(f"\n{m['label']}, L={L}: n/a, {note}")
    for m in results['models']:
        if all(r is None for by_depth in m['results'].values() for r in by_depth.values()):
            continue  # nothing but n/a
        for what, title in (('acc', 'accuracy'), ('ll', 'log-likelihood per digit (chance -2.30)')):
            lines += ['', f"{m['label']}: {title}, rows = depth, columns = length", '',
                      '| depth | ' + ' | '.join(map(str, Ls)) + ' |', '|---:|' + '---:|' * len(Ls)]
            for d in ds:
                lines.append(f'| {d:g} | ' + ' | '.join(cell(m['results'][str(L)][str(d)], what) for L in Ls) + ' |')
    return '\n'.join(lines)


# -----------------------------------------------------------------------------


def evaluate(config, log=print):
    from tqdm import tqdm

    paths = [resolve_ckpt_path(p.strip()) for p in str(config['ckpt']).split(',') if p.strip()]
    if not paths:
        raise ValueError("--ckpt is empty: pass out_dir(s) or ckpt.pt path(s), comma-separated")
    try:
        ds = sorted({float(d) for d in str(config['depths']).replace(' ', '').split(',') if d})
    except ValueError:
        raise ValueError(f"--depths={config['depths']}: expected comma-separated fractions, e.g. 0,0.5,1") from None
    if not ds or min(ds) < 0 or max(ds) > 1:
        raise ValueError(f"--depths={config['depths']}: depths are fractions of the context, within [0, 1]")
    for key in ('key_digits', 'num_trials', 'batch_size', 'max_factor'):
        if config[key] < 1:
            raise ValueError(f"--{key}={config[key]} must be >= 1")
    if config['filler'] not in ('repeat', 'data'):
        raise ValueError(f"--filler={config['filler']}: use 'repeat' or 'data'")
    models = load_models(paths, config, log)
    names = make_labels(models, config['labels'])
    if config['lengths']:
        Ls = parse_lengths(config['lengths'])
    else:
        Ls = sorted({L for m in models for L in dyadic_lengths(m['trained'], config['max_factor'], 0.5)})
    dev = pick_device(config['device'])
    autocast = autocast_for(dev, config['dtype'])
    n_new = config['key_digits'] + 2  # enough for the key however it is tokenized, plus what follows it
    log(f"device {dev}; lengths {Ls}; depths {ds}; {config['num_trials']} trials each")
    for name, m in zip(names, models):  # which implementation each model's attention runs
        log(f"{name}: {fast_attention.describe(m['model'], dev, getattr(autocast, 'fast_dtype', torch.float32))}")

    results = dict(lengths=Ls, depths=ds, num_trials=config['num_trials'], key_digits=config['key_digits'],
                   filler=config['filler'], config=dict(config), models=[])
    data_cache = {}
    for m, label in zip(models, names):
        model, cfg = m['model'], m['model'].config
        tok = get_tokenizer(tokenizer_name(m, config['tokenizer']))
        data = None
        if config['filler'] == 'data':
            from data.common import load_split, read_meta
            dd = config['data_dir'] or train_data_dir(m)
            if dd not in data_cache:
                meta = read_meta(dd)
                if meta['tokenizer'] != tok.name:
                    raise ValueError(f"{dd} holds {meta['tokenizer']} tokens, but {m['path']} uses {tok.name}")
                data_cache[dd] = load_split(dd, config['split'])
            data = data_cache[dd]
        model.to(dev)
        entry = dict(label=label, ckpt=m['path'], pos_encoding=cfg.pos_encoding, tokenizer=tok.name,
                     trained_block_size=m['trained'], results={}, notes={})
        bar = tqdm(total=len(Ls) * len(ds) * config['num_trials'], desc=label, unit='prompt',
                   disable=config['quiet'])
        for L in Ls:
            entry['results'][str(L)] = {}
            t0 = time.time()
            try:
                prompts = {d: make_trials(tok, L, d, config, data) for d in ds}
                na = None
            except PromptTooShort as e:
                na = str(e)
            # generation feeds key_digits+1 tokens after the prompt: learned PEs need room for them
            if cfg.pos_encoding == 'learned' and L + n_new - 1 > cfg.block_size:
                na = f"learned position embeddings stop at {cfg.block_size}; prompt + answer need {L + n_new - 1}"
            if na:
                entry['results'][str(L)] = {str(d): None for d in ds}
                entry['notes'][str(L)] = na
                bar.update(len(ds) * config['num_trials'])
                bar.write(f"{label:>24} L={L:>6}: n/a ({na})")
                continue
            # every prompt of this length is L tokens long, whatever its depth: batch them all together
            everything = [b for d in ds for b in prompts[d]]
            for i in range(0, len(everything), config['batch_size']):
                batch = everything[i:i + config['batch_size']]
                gen, ll = answer_and_score(model, [b['ids'] for b in batch], [b['answer'] for b in batch],
                                           n_new, autocast)
                for b, g, l in zip(batch, gen, ll):
                    b['generated'] = tok.decode(g)
                    b['correct'] = first_number(b['generated']) == b['key']
                    b['loglik_per_digit'] = l / config['key_digits']
                bar.update(len(batch))
            for d in ds:
                trials = prompts[d]
                entry['results'][str(L)][str(d)] = dict(
                    accuracy=sum(b['correct'] for b in trials) / len(trials),
                    loglik_per_digit=sum(b['loglik_per_digit'] for b in trials) / len(trials),
                    distance=sum(b['distance'] for b in trials) / len(trials),
                    trials=[dict(key=b['key'], generated=b['generated'], correct=b['correct'],
                                 loglik_per_digit=b['loglik_per_digit'], key_pos=b['key_pos'],
                                 distance=b['distance']) for b in trials])
            rs = entry['results'][str(L)].values()
            acc = sum(r['accuracy'] for r in rs) / len(ds)
            ll = sum(r['loglik_per_digit'] for r in rs) / len(ds)
            bar.write(f"{label:>24} L={L:>6}: accuracy {100 * acc:.0f}%, loglik/digit {ll:.3f} ({time.time() - t0:.1f}s)")
        bar.close()
        model.to('cpu')
        results['models'].append(entry)
    return results


def main(argv):
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:  # N copies would each score everything and race for the outputs
        sys.exit(f"error: eval_passkey.py runs in one process: start it with python, not torchrun "
                 f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")
    try:
        config = parse_config(argv, default_config(), __doc__)
        first = ([p.strip() for p in str(config['ckpt']).split(',') if p.strip()] or [None])[0]
        prefix = config['out'] or (first and os.path.join(os.path.dirname(resolve_ckpt_path(first)), 'passkey'))
        if prefix:
            check_writable(prefix)  # before the evaluation, not after it
        results = evaluate(config)
    except (ValueError, FileNotFoundError, TrainError) as e:  # bad settings, data or checkpoints
        sys.exit(f"error: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tables = markdown_tables(results)
    print()
    print(tables)
    with open(prefix + '.md', 'w') as f:
        f.write(tables + '\n')
    with open(prefix + '.json', 'w') as f:
        json.dump(results, f, indent=2)
        f.write('\n')
    print(f"wrote {prefix}.md\nwrote {prefix}.json")


if __name__ == '__main__':
    main(sys.argv[1:])
