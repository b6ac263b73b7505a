"""
Long-context perplexity: how well do trained models predict text at contexts up to 16x the length
they were trained at? This is where positional encodings part ways. What it measures: for each
checkpoint and context length, the perplexity of the same validation tokens, each scored with (at
least) that much context before it. RoPE's slowly rotating dims reach angles never seen in training
past the trained length, and its long-context family (PI, NTK, YaRN, a larger base) changes those
angles; TAPA has no per-dimension angle to leave its range. Whether a curve stays flat is what the
numbers say, not an assumption: in the tiny byte-level models of docs/long_context.md (zero-shot,
1x to 16x, the older sliding protocol), RoPE's perplexity grew 2.5x, TAPA's (small-model setting)
1.6x, ALiBi's stayed flat.

    python eval_ppl.py --ckpt=out-tapa,out-rope
    python eval_ppl.py --ckpt=out-rope --rope_scaling=yarn --rope_factor=16 --out=out-rope/ppl_yarn16
    python eval_ppl.py --ckpt=out-tapa --lengths=256,1024,4096 --max_docs=4 --max_tokens_per_length=20000

--ckpt takes out_dirs or paths to ckpt.pt files, comma-separated. The result is a markdown table on
stdout (rows = checkpoints, columns = context lengths) and, next to the --out prefix (default
<first out_dir>/ppl), the same table as .md, every number as .json and .csv (the differences between
models as .differences.csv), and a plot as .png (when matplotlib is installed).

The protocol (--protocol=spans, the default). Scored spans are chosen once, then scored at every
length: spans of `span` tokens (default a quarter of the shortest length), spread evenly through
each document, each starting at least max(skip, longest length) tokens into it. The skip (default
20,000 bytes or 5,000 GPT-2 tokens) passes a PG-19 book's front matter (producer line, title page,
contents), which otherwise dominates what is scored; the longest length leaves room for a whole
window before every span. At length L the model reads the L tokens that end with a span and its
last `span` outputs are scored, so every scored token has at least L - span tokens of context (the
1x column too: that is why a span is at most L/4 there). The same tokens at every length: along a
curve only the context changes. Documents without room for one span are left out of every length
and reported, with their token count. See select_spans() and span_windows().

Intervals: each perplexity, each ratio to the first length and each difference between two models
gets a 95% interval from a paired bootstrap over documents (--bootstrap resamples; the same draws
for every model and length). With fewer than 10 documents they understate the variance between
books, and the output says so. Tune on --split=validation, report on --split=test. The JSON keeps
what the intervals resample: each result's sums per document (doc_nll, doc_tokens, in the order of
doc_ids), so that several runs (e.g. seeds, experiments/paper_in_miniature.py) can be bootstrapped
together over the same documents.

--protocol=sliding is the older protocol, kept to compare with published numbers that used it
(Press et al. 2021; YaRN's and the TAPA paper's scripts): each document is read in windows of L
tokens that move forward --stride tokens at a time, each scoring the tokens it adds, the first
window of a document all of its tokens, from the document's first bytes. Its caveats: a document's
front matter is scored, at stride >= L a token has on average only L/2 of context, and first
windows (with less context than L) are a large part of what long lengths score. --same_docs picks
the same documents at every length or not (see sliding_windows() and select_documents()).

Budget: --max_docs and --max_tokens_per_length bound the cost, deterministically (documents in the
split's order, spans dealt to them in turn). Each scored span or window is a full forward pass of L
tokens, so a length costs about (scored tokens / span) forward passes of L tokens. On a laptop CPU,
lower --max_tokens_per_length or the largest length first; on a GPU, raise them.

Inference-time context extension (no fine-tuning) is an override of the checkpoint's config:
--rope_scaling={pi,ntk,dynamic_ntk,yarn,none} --rope_factor=s --rope_base=5e5 (ABF); they apply to
RoPE checkpoints only. Checkpoints fine-tuned at a longer context already carry their extension in
model_args and need no flag. --attn_impl=auto (default) picks the memory-efficient TAPA attention
at long lengths; naive/chunked/triton force one.
"""

import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F

import fast_attention
from configurator import get_overrides
from finetune_long import change_context
from model import GPTConfig
from runtime import TrainError, autocast_for, check_writable, load_checkpoint, model_from_checkpoint, pick_device

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# default config values, overridden by a config file and/or --key=value on the command line
ckpt = 'out'                 # out_dir(s) or ckpt.pt path(s), comma-separated
labels = ''                  # optional comma-separated row labels, one per checkpoint (default: from the config)
data_dir = ''                # default: data/<dataset>/<tokenizer> from the (first) checkpoint's train config
split = 'validation'
lengths = ''                 # comma-separated context lengths; '' = dyadic, trained length .. max_factor x it
max_factor = 16              # the default lengths go up to max_factor times the trained context
protocol = 'spans'           # 'spans' (the same scored spans at every length, see above) or 'sliding'
skip = -1                    # spans: each document's first tokens are never scored; -1 = PG-19's front matter:
                             # 20,000 bytes or 5,000 GPT-2 tokens on pg19, 0 on other datasets
span = 0                     # spans: scored tokens per span; 0 = a quarter of the shortest length
bootstrap = 1000             # resamples of the documents for the 95% intervals (0 = no intervals)
stride = 256                 # sliding: S of the sliding window (capped at L); stride = L gives back-to-back chunks
same_docs = True             # sliding: score the same tokens at every length (see above)
max_docs = 0                 # use at most this many documents per length (0 = all that are long enough)
max_tokens_per_length = 32768  # scored tokens per length and checkpoint (0 = everything): bounds the cost
batch_tokens = 16384         # windows per batch = max(1, batch_tokens // L)
out = ''                     # output prefix; '' = <first out_dir>/ppl -> ppl.json, ppl.csv, ppl.md, ppl.png
device = 'auto'              # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'               # 'auto' (bfloat16 autocast on CUDA, float16 before Ampere, else float32), ...
attn_impl = 'auto'           # 'auto', 'naive', 'chunked', 'triton' (overrides the checkpoint's)
rope_scaling = 'keep'        # 'keep' the checkpoint's, or 'none', 'pi', 'ntk', 'dynamic_ntk', 'yarn'
rope_factor = 0.0            # 0 = keep the checkpoint's
rope_base = 0.0              # 0 = keep the checkpoint's (e.g. 5e5 for ABF)
quiet = False                # no progress bars
# -----------------------------------------------------------------------------


def default_config():
    """This script's config keys and their default values (the globals above)."""
    g = globals()
    return {k: g[k] for k in ('ckpt', 'labels', 'data_dir', 'split', 'lengths', 'max_factor', 'protocol', 'skip',
                              'span', 'bootstrap', 'stride',
                              'same_docs', 'max_docs', 'max_tokens_per_length', 'batch_tokens', 'out', 'device', 'dtype',
                              'attn_impl', 'rope_scaling', 'rope_factor', 'rope_base', 'quiet')}


# -----------------------------------------------------------------------------
# command line: `python eval_ppl.py [config.py] --key=value ...`, parsed by configurator.py like
# train.py's: unknown keys and wrongly typed values are errors. String settings stay strings, so
# --lengths=256,512 and --ckpt=out-a,out-b need no quotes.


def parse_config(argv, defaults, doc=None):
    """defaults updated with the config files and --key=value settings of argv (-h/--help: print
    doc, the script's usage, and the settings with their defaults, then exit)."""
    config = dict(defaults)
    config.update(get_overrides(defaults, argv, doc=doc))
    return config


# -----------------------------------------------------------------------------
# the protocol


def sliding_windows(doc_len, L, S):
    """The windows that score a document of doc_len tokens at context length L with stride S.

    Returns a list of (start, end, score_from): the model reads tokens[start:end], and its outputs at
    positions score_from .. end-1 are scored. The output at position p predicts token p+1, having
    seen the p-start+1 tokens tokens[start:p+1] (its context).
    - The first window is [0, L) and scores all its outputs: tokens 1..L, with 1..L tokens of context
      (a document's beginning has no more to give).
    - Each next window ends S positions further (the last one fewer, at the document's end), starts L
      before its end, and scores only the positions it adds: each of its scored tokens has a context
      of at least L-S+1 tokens.
    So every token but the document's first (nothing predicts it) is scored exactly once, and S = L
    gives back-to-back chunks, as in training. A document shorter than L+1 gets one shorter window.
    """
    if L < 1 or S < 1:
        raise ValueError(f"context length L={L} and stride S={S} must be positive")
    S = min(S, L)
    n_pos = doc_len - 1  # positions that have a next token to predict
    if n_pos < 1:
        return []
    end = min(L, n_pos)
    windows = [(0, end, 0)]
    while end < n_pos:
        new_end = min(end + S, n_pos)
        windows.append((max(0, new_end - L), new_end, end))
        end = new_end
    return windows


def dyadic_lengths(block_size, max_factor=16, min_factor=1):
    """block_size * 2^k for min_factor <= 2^k <= max_factor, e.g. 256 -> [256, 512, ..., 4096]."""
    out, f = [], 1.0
    while f > min_factor:  # allow min_factor < 1 (e.g. 0.5 for half the trained length)
        f /= 2
    while f <= max_factor:
        if f >= min_factor and int(block_size * f) >= 1:
            out.append(int(block_size * f))
        f *= 2
    return out


def parse_lengths(text):
    try:
        values = [int(v) for v in str(text).replace(' ', '').split(',') if v]
    except ValueError:
        raise ValueError(f"--lengths={text}: expected comma-separated integers, e.g. --lengths=256,512,1024") from None
    if not values or min(values) < 2:
        raise ValueError(f"--lengths={text}: expected one or more lengths, each at least 2")
    return sorted(set(values))


def select_documents(doc_lengths, L, max_docs=0, max_tokens=0):
    """The documents scored at length L, as a list of (document index, tokens to use from its start).
    Eligible: documents of at least L+1 tokens, in their order in the split; the first max_docs of
    them (0 = all). With a budget of max_tokens scored tokens, it is shared evenly among them, at least
    one full window (L scored tokens) each, and fewer documents are used if the budget cannot give
    every one a full window. Deterministic: the same data gives the same selection."""
    doc_lengths = np.asarray(doc_lengths)
    eligible = np.nonzero(doc_lengths >= L + 1)[0]
    if max_docs:
        eligible = eligible[:max_docs]
    if not max_tokens or not len(eligible):
        return [(int(i), int(doc_lengths[i])) for i in eligible]
    n = min(len(eligible), max(1, max_tokens // L))
    per_doc = max(L, max_tokens // n)  # scored tokens per document; the document's tokens are one more
    return [(int(i), int(min(doc_lengths[i], per_doc + 1))) for i in eligible[:n]]


SKIP = {'byte': 20000, 'gpt2': 5000}  # tokens: about 20 KB of text, past a PG-19 book's front matter


def select_spans(doc_lengths, first, span, max_docs=0, max_tokens=0):
    """The scored spans of the 'spans' protocol, chosen once for every length: a list of (document,
    start), each span scoring the tokens start+1 .. start+span, start >= first (first = max(skip, the
    longest length): past the front matter, and with room for a whole window of every length before
    it). A document takes as many spans as fit after `first`, spread evenly through it (each in an
    equal slice of what follows `first`); with a budget of max_tokens scored tokens, the spans are
    dealt to the documents in turn, so every document gets its share. Documents with no room for one
    span are left out of every length, and returned, not dropped silently: (spans, too_short)."""
    if span < 1:
        raise ValueError(f"span={span} must be at least 1")
    room = [(i, (int(n) - 1 - first) // span) for i, n in enumerate(doc_lengths)]  # spans that fit
    usable = [(i, r) for i, r in room if r >= 1]
    too_short = [i for i, r in room if r < 1]
    if max_docs:
        usable = usable[:max_docs]
    budget = max_tokens // span if max_tokens else sum(r for _, r in usable)
    take = dict.fromkeys((i for i, _ in usable), 0)
    while budget > 0 and any(take[i] < r for i, r in usable):
        for i, r in usable:  # one more span for each document that has room, in turn
            if budget > 0 and take[i] < r:
                take[i], budget = take[i] + 1, budget - 1
    spans = []
    for i, _ in usable:
        slot = (int(doc_lengths[i]) - 1 - first) // max(take[i], 1)  # >= span, as take[i] <= room
        spans += [(i, first + j * slot) for j in range(take[i])]
    return spans, too_short


def span_windows(spans, L, span):
    """The window of each span at length L, as sliding_windows gives them: (document, (start, end,
    score_from)): the model reads tokens[end-L:end] and the last `span` outputs are scored, the first
    of them with L-span+1 tokens of context, the last with L."""
    return [(d, (s + span - L, s + span, s)) for d, s in spans]


@torch.no_grad()
def score_windows(model, docs, jobs, batch_size=1, autocast=nullcontext(), progress=None, head_rows=1024):
    """-log p(token | its window's context), summed per document over the scored outputs of jobs, a
    list of (document index into docs, (start, end, score_from)). Returns dict(nll, tokens: arrays of
    one entry per document, first_window_tokens).

    The transformer runs on whole windows (B, L), but the output layer (n_embd x vocab) only on the
    scored positions, head_rows at a time: at L = 16k, the logits of a whole GPT-2-vocab window would
    take 16k * 50k * 4 bytes = 3.3 GB, of which a stride of 256 scores 1/64."""
    dev = next(model.parameters()).device
    total = dict(nll=np.zeros(len(docs)), tokens=np.zeros(len(docs), dtype=np.int64), first_window_tokens=0)
    i = 0
    while i < len(jobs):
        # a batch: consecutive windows of the same length (all are L long unless a document is shorter)
        width = jobs[i][1][1] - jobs[i][1][0]
        batch = [jobs[i]]
        while (len(batch) < batch_size and i + len(batch) < len(jobs)
               and jobs[i + len(batch)][1][1] - jobs[i + len(batch)][1][0] == width):
            batch.append(jobs[i + len(batch)])
        i += len(batch)
        x = torch.stack([torch.from_numpy(np.asarray(docs[d][s:e], dtype=np.int64)) for d, (s, e, _) in batch])
        with autocast:
            h = model.hidden(x.to(dev))  # (B, width, n_embd)
        # the scored positions of each window, and the tokens they predict
        rows = torch.cat([h[b, f - s:] for b, (d, (s, e, f)) in enumerate(batch)])
        targets = torch.cat([torch.from_numpy(np.asarray(docs[d][f + 1:e + 1], dtype=np.int64))
                             for d, (s, e, f) in batch]).to(dev)
        owner = np.concatenate([np.full(e - f, d) for d, (s, e, f) in batch])  # each row's document
        for r in range(0, rows.size(0), head_rows):
            with autocast:
                logits = model.lm_head(rows[r:r + head_rows])
            nll = F.cross_entropy(logits.float(), targets[r:r + head_rows], reduction='none').double().cpu().numpy()
            np.add.at(total['nll'], owner[r:r + head_rows], nll)
        np.add.at(total['tokens'], owner, 1)
        total['first_window_tokens'] += sum(e - f for d, (s, e, f) in batch if s == 0 and f == 0)
        if progress is not None:
            progress.update(targets.numel())
    return total


def sliding_window_nll(model, docs, L, S, batch_size=1, autocast=nullcontext(), progress=None, head_rows=1024):
    """The 'sliding' protocol: the sum of -log p(token | its window's context) over every scored token
    of docs (1-D int arrays) at context length L and stride S (sliding_windows). Returns dict(nll,
    tokens, windows, first_window_tokens, doc_nll, doc_tokens: the sums per document)."""
    jobs = [(d, w) for d, doc in enumerate(docs) for w in sliding_windows(len(doc), L, S)]
    r = score_windows(model, docs, jobs, batch_size, autocast, progress, head_rows)
    return dict(nll=float(r['nll'].sum()), tokens=int(r['tokens'].sum()), windows=len(jobs),
                first_window_tokens=r['first_window_tokens'], doc_nll=r['nll'], doc_tokens=r['tokens'])


# -----------------------------------------------------------------------------
# checkpoints


def resolve_ckpt_path(path):
    """An out_dir or a ckpt.pt file -> the checkpoint file, with a useful error if there is none."""
    p = path if os.path.isfile(path) or path.endswith('.pt') else os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no checkpoint at {p}: pass --ckpt=<out_dir or path/to/ckpt.pt> of a model "
                                f"trained with train.py or fine-tuned with finetune_long.py (they write "
                                f"<out_dir>/ckpt.pt)")
    return p


def apply_overrides(model, attn_impl='auto', rope_scaling='keep', rope_factor=0.0, rope_base=0.0):
    """Inference-time changes to a loaded model: the attention implementation, and for RoPE models
    a context-extension method (no fine-tuning). Goes through finetune_long.change_context, which also
    records the trained length as rope_original_block_size (PI, NTK and YaRN scale relative to it).
    The model keeps its block_size: it is still the length the model was trained at.
    Returns the list of overrides that did not apply (RoPE ones on a non-RoPE model)."""
    cfg = model.config
    pe = {'attn_impl': attn_impl}
    rope = {}
    if rope_scaling != 'keep':
        rope['rope_scaling'] = None if str(rope_scaling).lower() == 'none' else rope_scaling
    if rope_factor:
        rope['rope_factor'] = float(rope_factor)
    if rope_base:
        rope['rope_base'] = float(rope_base)
    ignored = []
    if cfg.pos_encoding == 'rope':
        pe.update(rope)
        scaling = pe.get('rope_scaling', cfg.rope_scaling)
        factor = pe.get('rope_factor', cfg.rope_factor)
        if scaling is None and rope_factor:
            raise ValueError(f"rope_factor={rope_factor:g} does nothing without a rope_scaling: pass one too, e.g. "
                             f"--rope_scaling=yarn --rope_factor={rope_factor:g}")
        if scaling in ('pi', 'ntk', 'yarn') and factor <= 1.0:
            raise ValueError(f"rope_scaling={scaling} with rope_factor={factor} changes nothing: pass the "
                             f"extension factor, e.g. --rope_factor=16 to reach 16x the trained length")
    else:
        ignored = sorted(rope)
    change_context(model, cfg.block_size, **pe)
    return ignored


def describe(cfg):
    """A short row label from the config, e.g. 'tapa', 'rope', 'rope yarn x16', 'rope base=5e+05'."""
    if cfg.pos_encoding == 'rope':
        parts = ['rope']
        if cfg.rope_base != 10000.0:
            parts.append(f'base={cfg.rope_base:g}')
        if cfg.rope_scaling:
            parts.append(f'{cfg.rope_scaling} x{cfg.rope_factor:g}')
        if cfg.rope_original_block_size and cfg.rope_original_block_size != cfg.block_size:
            parts.append(f'ft{cfg.block_size}')  # fine-tuned from rope_original_block_size to block_size
        return ' '.join(parts)
    if cfg.pos_encoding == 'tapa':
        defaults = GPTConfig()
        parts = ['tapa']
        if cfg.tapa_alpha != defaults.tapa_alpha:
            parts.append(f'a={cfg.tapa_alpha:g}')
        if cfg.tapa_theta != defaults.tapa_theta:
            parts.append(f'th={cfg.tapa_theta:g}')
        if cfg.tapa_phase != defaults.tapa_phase:
            parts.append(cfg.tapa_phase)
        return ' '.join(parts)
    return cfg.pos_encoding


def make_labels(models, explicit=''):
    """One label per model: explicit ones (comma-separated), else describe(); duplicates get their run name."""
    if explicit:
        out = [s.strip() for s in explicit.split(',')]
        if len(out) != len(models):
            raise ValueError(f"--labels has {len(out)} labels for {len(models)} checkpoints")
        return out
    out = [describe(m['model'].config) for m in models]
    for i, label in enumerate(out):
        if out.count(label) > 1:
            out[i] = f"{label} [{run_name(models[i]['path'])}]"
    return out


def run_name(path):
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path


def load_models(paths, config, log=print):
    """Load every checkpoint and apply the command line's overrides. Returns a list of dicts:
    path, model (on the CPU), train_config, trained (the block_size it was trained at)."""
    models = []
    for p in paths:
        checkpoint = load_checkpoint(p)
        try:  # (it refuses model_args this model.py lacks, and weights that do not fit them)
            model = model_from_checkpoint(checkpoint).eval()
        except TrainError as e:
            raise TrainError(f"{p}: {e}") from None
        trained = model.config.block_size
        ignored = apply_overrides(model, config['attn_impl'], config['rope_scaling'],
                                  config['rope_factor'], config['rope_base'])
        if ignored:
            log(f"note: {p} is a {model.config.pos_encoding} model; ignoring {', '.join(ignored)}")
        models.append(dict(path=p, model=model, train_config=checkpoint.get('config') or {}, trained=trained))
    return models


def data_dir_for(models, explicit=''):
    """--data_dir, else the folder the checkpoint was trained on (its data_dir, or data/<dataset>/<tokenizer>
    in this repository, as train.py picks it), which must agree across checkpoints: perplexities over
    different tokenizations cannot be compared."""
    if explicit:
        return explicit
    dirs = set()
    for m in models:
        dirs.add(train_data_dir(m))
    if len(dirs) > 1:
        raise ValueError(f"the checkpoints were trained on different data {sorted(dirs)}: evaluate them "
                         f"separately, or pass --data_dir to score all on one (same tokenizer only)")
    return dirs.pop()


def train_data_dir(m):
    c = m['train_config']
    if c.get('data_dir'):
        return c['data_dir']
    if 'dataset' not in c or 'tokenizer' not in c:
        raise ValueError(f"{m['path']} does not record its dataset and tokenizer; pass --data_dir=data/<dataset>/<tokenizer>")
    return os.path.join(REPO_ROOT, 'data', c['dataset'], c['tokenizer'])


def check_data_fits(meta, models, data_dir):
    for m in models:
        cfg, tc = m['model'].config, m['train_config']
        if 'tokenizer' in tc and tc['tokenizer'] != meta['tokenizer']:
            raise ValueError(f"{m['path']} was trained with the {tc['tokenizer']} tokenizer but {data_dir} "
                             f"holds {meta['tokenizer']} tokens")
        if meta['vocab_size'] > cfg.vocab_size:
            raise ValueError(f"{data_dir} has vocab {meta['vocab_size']}, more than {m['path']}'s {cfg.vocab_size}")


# -----------------------------------------------------------------------------
# output


def fmt_ppl(v):
    if v is None or not math.isfinite(v):
        return 'n/a' if v is None else f'{v}'
    return f'{v:.3f}' if v < 100 else f'{v:.1f}' if v < 1e5 else f'{v:.3g}'


def fmt_ci(ci, fmt=fmt_ppl):
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ''


def markdown_table(results):
    """Perplexity per model and length (with its 95% interval), the ratio to the first length, the
    differences between models, and what was scored."""
    lengths = results['lengths']
    head = ['| model | trained | ' + ' | '.join(str(L) for L in lengths) + ' |', '|---|---:|' + '---:|' * len(lengths)]
    lines = list(head)
    for m in results['models']:
        cells = [fmt_ppl(m['results'][str(L)]['ppl']) + fmt_ci(m['results'][str(L)].get('ci')) for L in lengths]
        lines.append(f"| {m['label']} | {m['trained_block_size']} | " + ' | '.join(cells) + ' |')
    if 'bootstrap' in results:
        lines += ['', f"ratio to the first length, 95% intervals from {results['bootstrap']['resamples']} paired "
                      f"resamples of the {results['bootstrap']['documents']} documents:", ''] + head
        for m in results['models']:
            cells = [f"{r['ratio']:.3f}" + fmt_ci(r.get('ratio_ci'), lambda v: f'{v:.3f}') if 'ratio' in r else 'n/a'
                     for r in (m['results'][str(L)] for L in lengths)]
            lines.append(f"| {m['label']} | {m['trained_block_size']} | " + ' | '.join(cells) + ' |')
        if results['differences']:
            lines += ['', '| difference in perplexity | length | a - b | 95% interval |', '|---|---:|---:|---:|']
            lines += [f"| {d['a']} - {d['b']} | {d['length']} | {d['diff']:.3f} |"
                      f"{fmt_ci(d['ci'], lambda v: f'{v:.3f}')} |" for d in results['differences']]
    what = 'span' if results.get('protocol') == 'spans' else 'stride'
    lines += ['', f'| length | {what} | docs | scored tokens | windows |', '|---:|---:|---:|---:|---:|']
    for L in lengths:
        d = results['data_per_length'][str(L)]
        lines.append(f"| {L} | {results['span'] if what == 'span' else d['stride']} | {d['docs']} | {d['tokens']} "
                     f"| {d['windows']} |")
    if results.get('protocol') == 'spans':
        lines.append(f"\n{results['documents']} documents scored, {results['too_short']} too short for the longest "
                     f"length after skipping {results['skip']} tokens (left out of every length).")
    return '\n'.join(lines)


def write_outputs(results, prefix, log=print):
    """prefix.json, prefix.csv, prefix.md and (with matplotlib) prefix.png. Returns the paths written."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    written = []
    with open(prefix + '.json', 'w') as f:
        json.dump(results, f, indent=2)  # n/a cells are null
        f.write('\n')
    written.append(prefix + '.json')
    with open(prefix + '.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['label', 'ckpt', 'pos_encoding', 'trained_block_size', 'length', 'stride',
                    'ppl', 'ppl_lo', 'ppl_hi', 'ratio', 'ratio_lo', 'ratio_hi', 'loss', 'docs', 'tokens', 'windows',
                    'seconds'])
        for m in results['models']:
            for L in results['lengths']:
                r = m['results'][str(L)]
                na = r['ppl'] is None
                ci, rci = r.get('ci') or ['', ''], r.get('ratio_ci') or ['', '']
                w.writerow([m['label'], m['ckpt'], m['pos_encoding'], m['trained_block_size'], L, r['stride'],
                            'n/a' if na else r['ppl'], *ci, r.get('ratio', ''), *rci, 'n/a' if na else r['loss'],
                            r['docs'], r['tokens'], r['windows'], r['seconds']])
    written.append(prefix + '.csv')
    if results.get('differences'):  # model a minus model b, on the same documents
        with open(prefix + '.differences.csv', 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['a', 'b', 'length', 'ppl_a_minus_b', 'lo', 'hi'])
            w.writerows([d['a'], d['b'], d['length'], d['diff'], *d['ci']] for d in results['differences'])
        written.append(prefix + '.differences.csv')
    with open(prefix + '.md', 'w') as f:
        f.write(markdown_table(results) + '\n')
    written.append(prefix + '.md')
    png = plot(results, prefix + '.png', log)
    if png:
        written.append(png)
    return written


def plot(results, path, log=print):
    try:
        import matplotlib
        matplotlib.use('Agg')  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed, no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in results['models']:
        xs = [L for L in results['lengths'] if m['results'][str(L)]['ppl'] is not None]
        line, = ax.plot(xs, [m['results'][str(L)]['ppl'] for L in xs], marker='o', label=m['label'])
        bands = [L for L in xs if m['results'][str(L)].get('ci')]
        if bands:  # the 95% interval over documents
            lo_hi = zip(*(m['results'][str(L)]['ci'] for L in bands))
            ax.fill_between(bands, *lo_hi, color=line.get_color(), alpha=0.2)
    for t in sorted({m['trained_block_size'] for m in results['models']}):
        ax.axvline(t, color='gray', linestyle='--', linewidth=1)
        ax.text(t, 1.0, f' trained {t}', transform=ax.get_xaxis_transform(), va='top', fontsize=8, color='gray')
    ax.set_xscale('log', base=2)
    ax.set_xticks(results['lengths'], [str(L) for L in results['lengths']])
    ax.minorticks_off()
    ppls = [r['ppl'] for m in results['models'] for r in m['results'].values() if r['ppl'] is not None]
    if ppls and max(ppls) > 3 * min(ppls):
        ax.set_yscale('log')  # an exploding perplexity spans orders of magnitude
    ax.set_xlabel('context length L (tokens)')
    ax.set_ylabel('perplexity')
    how = (f"the same {results['span']}-token spans at every length" if results.get('protocol') == 'spans'
           else f"sliding window (stride {results['stride']})")
    ax.set_title(f"{results['split']} perplexity, {how}")
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------


def evaluate(config, log=print):
    """Run the whole evaluation for a config dict (see default_config()); returns the results dict
    that is also written to <out>.json."""
    from tqdm import tqdm
    from data.common import load_split, read_meta

    # 0 means "all" for the budgets; a negative one would quietly drop documents (eligible[:-1])
    for key in ('max_docs', 'max_tokens_per_length'):
        if config[key] < 0:
            raise ValueError(f"--{key}={config[key]} must be >= 0 (0 = no limit)")
    for key in ('max_factor', 'stride', 'batch_tokens'):
        if config[key] < 1:
            raise ValueError(f"--{key}={config[key]} must be >= 1")
    if config['protocol'] not in ('spans', 'sliding'):
        raise ValueError(f"--protocol={config['protocol']}: use 'spans' (the default) or 'sliding'")
    for key, low in (('skip', -1), ('span', 0), ('bootstrap', 0)):
        if config[key] < low:
            raise ValueError(f"--{key}={config[key]} must be >= {low}")
    paths = [resolve_ckpt_path(p.strip()) for p in str(config['ckpt']).split(',') if p.strip()]
    if not paths:
        raise ValueError("--ckpt is empty: pass out_dir(s) or ckpt.pt path(s), comma-separated")
    models = load_models(paths, config, log)
    names = make_labels(models, config['labels'])
    data_dir = data_dir_for(models, config['data_dir'])
    meta = read_meta(data_dir)
    check_data_fits(meta, models, data_dir)
    tokens, offsets = load_split(data_dir, config['split'])
    doc_lengths = np.diff(offsets)

    if config['lengths']:
        Ls = parse_lengths(config['lengths'])
    else:  # dyadic from each trained length up to max_factor x it, all checkpoints together
        Ls = sorted({L for m in models for L in dyadic_lengths(m['trained'], config['max_factor'])})

    dev = pick_device(config['device'])
    autocast = autocast_for(dev, config['dtype'])
    log(f"data: {data_dir} split {config['split']} ({len(doc_lengths)} documents, {len(tokens):,} tokens); "
        f"device {dev}; lengths {Ls}")
    for name, m in zip(names, models):  # which implementation each model's attention runs
        log(f"{name}: {fast_attention.describe(m['model'], dev, getattr(autocast, 'fast_dtype', torch.float32))}")

    # what is scored depends only on the data, the same for every checkpoint
    budget = (config['max_docs'], config['max_tokens_per_length'])
    results = dict(split=config['split'], data_dir=data_dir, protocol=config['protocol'], stride=config['stride'],
                   lengths=Ls, config=dict(config), data_per_length={}, models=[])
    if config['protocol'] == 'spans':
        span = config['span'] or max(1, min(Ls) // 4)
        front_matter = SKIP.get(meta['tokenizer'], 5000) if meta.get('dataset') == 'pg19' else 0
        skip = config['skip'] if config['skip'] >= 0 else front_matter
        first = max(skip, max(Ls))
        if span > min(Ls):
            raise ValueError(f"--span={span} is longer than the shortest length {min(Ls)}")
        if 0 < config['max_tokens_per_length'] < span:
            raise ValueError(f"--max_tokens_per_length={config['max_tokens_per_length']} is less than one span of {span} "
                             f"tokens: nothing would be scored")
        spans, too_short = select_spans(doc_lengths, first, span, *budget)
        used = sorted({d for d, _ in spans})
        results.update(span=span, skip=skip, documents=len(used), too_short=len(too_short),
                       too_short_tokens=int(sum(doc_lengths[i] for i in too_short)))
        log(f"spans: {len(spans)} spans of {span} tokens in {len(used)} documents, each at least {first:,} tokens "
            f"in (skip {skip:,}), scored at every length; {len(too_short)} documents ({results['too_short_tokens']:,} "
            f"tokens) are too short and left out of every length")
        position = {d: j for j, d in enumerate(used)}
        selection = {L: span_windows([(position[d], st) for d, st in spans], L, span) for L in Ls}
        doc_ids = used
    else:  # 'sliding': the old protocol (as YaRN's and the TAPA paper's scripts score)
        if config['same_docs']:
            # the same tokens at every length: chosen for the longest length some document can fill
            reachable = [L for L in Ls if np.any(doc_lengths >= L + 1)]
            common = select_documents(doc_lengths, max(reachable), *budget) if reachable else []
            chosen = {L: common if L in reachable else [] for L in Ls}
            if reachable:
                log(f"scoring the same {len(common)} documents ({sum(n - 1 for _, n in common):,} tokens) at every "
                    f"length up to {max(reachable)} (--same_docs=False uses all documents long enough for each length)")
        else:
            chosen = {L: select_documents(doc_lengths, L, *budget) for L in Ls}
        doc_ids = sorted({i for docs in chosen.values() for i, _ in docs})
        position = {d: j for j, d in enumerate(doc_ids)}
        selection = {L: [(position[i], w) for i, n in chosen[L]
                         for w in sliding_windows(n, L, min(config['stride'], L))] for L in Ls}
    docs = [tokens[offsets[i]:offsets[i + 1]] for i in doc_ids]
    results['doc_ids'] = [int(i) for i in doc_ids]  # the order of every result's doc_nll and doc_tokens
    for L in Ls:
        jobs = selection[L]
        used_docs = sorted({d for d, _ in jobs})
        results['data_per_length'][str(L)] = dict(
            stride=min(config['stride'], L), docs=len(used_docs), windows=len(jobs),
            tokens=sum(e - f for _, (s, e, f) in jobs), doc_ids=[doc_ids[d] for d in used_docs])
        if not jobs:
            log(f"note: no {config['split']} document has room for length {L}; it is skipped")
    if len(doc_ids) < 10 and config['bootstrap']:
        log(f"note: {len(doc_ids)} documents: the intervals, resampling documents, understate the variance "
            f"between books (10 or more give them meaning)")

    per_doc = {}  # (model number, L) -> (nll, tokens) per document: what the bootstrap resamples
    for m, label in zip(models, names):
        model, cfg = m['model'], m['model'].config
        model.to(dev)
        entry = dict(label=label, ckpt=m['path'], pos_encoding=cfg.pos_encoding, trained_block_size=m['trained'],
                     model_args=dict(vars(cfg)), results={})
        for L in Ls:
            jobs = selection[L]
            na = None
            if cfg.pos_encoding == 'learned' and L > cfg.block_size:
                na = f'learned position embeddings stop at {cfg.block_size}'
            elif not jobs:
                na = f'no document has room for length {L}'
            if na:
                entry['results'][str(L)] = dict(ppl=None, loss=None, stride=min(config['stride'], L), docs=0, tokens=0,
                                                windows=0, seconds=0.0, note=na)
                log(f"{label:>24} L={L:>6}: n/a ({na})")
                continue
            n_scored = results['data_per_length'][str(L)]['tokens']
            bar = tqdm(total=n_scored, desc=f'{label} L={L}', unit='tok', disable=config['quiet'], leave=False)
            t0 = time.time()
            r = score_windows(model, docs, jobs, max(1, config['batch_tokens'] // L), autocast, bar)
            bar.close()
            loss = float(r['nll'].sum() / r['tokens'].sum())
            per_doc[(len(results['models']), L)] = (r['nll'], r['tokens'])
            entry['results'][str(L)] = dict(ppl=math.exp(min(loss, 700.0)), loss=loss, stride=min(config['stride'], L),
                                            docs=int((r['tokens'] > 0).sum()), tokens=int(r['tokens'].sum()),
                                            windows=len(jobs), first_window_tokens=r['first_window_tokens'],
                                            seconds=round(time.time() - t0, 3),
                                            # the sums per document (results['doc_ids'] order, 0 where a
                                            # document is not scored at L): what a later analysis, e.g.
                                            # a bootstrap over several runs, needs to resample documents
                                            doc_nll=[float(v) for v in r['nll']],
                                            doc_tokens=[int(v) for v in r['tokens']])
            log(f"{label:>24} L={L:>6}: loss {loss:.4f} ppl {fmt_ppl(math.exp(min(loss, 700.0)))} "
                f"({entry['results'][str(L)]['docs']} docs, {n_scored} tokens, {len(jobs)} windows, "
                f"{time.time() - t0:.1f}s)")
        model.to('cpu')
        results['models'].append(entry)
    if config['bootstrap']:
        add_intervals(results, per_doc, config['bootstrap'])
    return results


def add_intervals(results, per_doc, n_resamples, seed=0):
    """95% intervals from a paired bootstrap over documents: n_resamples times, draw as many documents
    as were scored, with replacement, and recompute every perplexity from their sums. The same draws
    serve every model and length, so a ratio to the first length and a difference between two models
    come from the same documents on both sides (paired). Adds ci, ratio, ratio_ci to each result and a
    'differences' list of (a, b, L, ppl_a - ppl_b, ci)."""
    if not per_doc:
        return
    rng = np.random.default_rng(seed)
    # paired only where every model and length scored the same documents ('sliding' with
    # --same_docs=False scores others at each length): then each cell resamples its own documents
    used = [tok > 0 for _, tok in per_doc.values()]
    paired = all(np.array_equal(u, used[0]) for u in used)
    draws = rng.choice(np.flatnonzero(used[0]), size=(n_resamples, int(used[0].sum())))

    def resampled(key):  # the perplexity of every resample
        nll, tok = per_doc[key]
        d = draws if paired else rng.choice(np.flatnonzero(tok > 0), size=(n_resamples, int((tok > 0).sum())))
        return np.exp(np.minimum(nll[d].sum(1) / np.maximum(tok[d].sum(1), 1), 700.0))

    def interval(x):
        return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]
    boot = {key: resampled(key) for key in per_doc}
    results['bootstrap'] = dict(resamples=n_resamples, documents=int(used[0].sum()), seed=seed, paired=paired)
    results['differences'] = []
    for i, m in enumerate(results['models']):
        ok = [L for L in results['lengths'] if (i, L) in boot]
        for L in ok:
            r = m['results'][str(L)]
            r['ci'] = interval(boot[(i, L)])
            r['ratio'] = r['ppl'] / m['results'][str(ok[0])]['ppl']
            r['ratio_ci'] = interval(boot[(i, L)] / boot[(i, ok[0])]) if paired else None
        for j in range(i + 1, len(results['models']) if paired else 0):
            for L in ok:
                if (j, L) in boot:
                    b = results['models'][j]
                    diff = m['results'][str(L)]['ppl'] - b['results'][str(L)]['ppl']
                    results['differences'].append(dict(a=m['label'], b=b['label'], length=L, diff=diff,
                                                       ci=interval(boot[(i, L)] - boot[(j, L)])))


def main(argv):
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:  # N copies would each score everything and race for the outputs
        sys.exit(f"error: eval_ppl.py runs in one process: start it with python, not torchrun "
                 f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")
    try:
        config = parse_config(argv, default_config(), __doc__)
        first = ([p.strip() for p in str(config['ckpt']).split(',') if p.strip()] or [None])[0]
        prefix = config['out'] or (first and os.path.join(os.path.dirname(resolve_ckpt_path(first)), 'ppl'))
        if prefix:
            check_writable(prefix)  # before the evaluation, not after it
        results = evaluate(config)
    except (ValueError, FileNotFoundError, TrainError) as e:  # bad settings, data or checkpoints
        sys.exit(f"error: {e}")
    table = markdown_table(results)
    print()
    print(table)
    for p in write_outputs(results, prefix):
        print(f"wrote {p}")


if __name__ == '__main__':
    main(sys.argv[1:])
