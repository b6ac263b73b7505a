"""
Train a GPT with a pluggable positional encoding, nanoGPT style.

    python train.py configs/quickstart.py                    # laptop CPU, under 10 minutes
    python train.py configs/tiny_rope.py --max_iters=500     # a config file, then any --key=value
    python train.py configs/pg19_gpt2_tapa.py                # one 24 GB GPU
    python train.py --out_dir=out-quickstart --init_from=resume   # continue an interrupted run

Everything goes to out_dir: ckpt.pt (model, optimizer and every random state, so a resumed run
continues exactly where it stopped) and log.jsonl (a JSON line per log_interval and per evaluation).

Reuse: the whole run is the function train(overrides, model=None). finetune_long.py calls it with a
pretrained model whose context it has raised (finetune_long.change_context), and so gets this same loop:
data, learning rate schedule, evaluation, checkpoints, logging, resume; arena.py with a batch source of
synthetic tasks instead of token files, and an evaluation hook that measures accuracy. Other scripts use
get_overrides (configurator.py), and load_checkpoint and model_from_checkpoint from runtime.py, which
also holds the device and precision policy and the checkpoint plumbing this file uses.
"""

import importlib.util
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fast_attention
from configurator import ConfigError, Settings, allowed_types, check_value, get_overrides, unknown_key_error
from model import GPT, GPTConfig, check_config
from runtime import (DTYPES, TrainError, autocast_for, compiles_on, gather_rng_states, init_distributed,
                     load_checkpoint, lock_out_dir, mean_over_ranks, os_errors, pick_dtype, restore_training,
                     rng_states, save_checkpoint, set_aside_previous_run, training_checkpoint, trim_log)
from tokenizer import TOKENIZERS

# -----------------------------------------------------------------------------
# default settings, overridden by a config file and --key=value (see configurator.py)
# I/O
out_dir = 'out'
eval_interval = 250          # evaluate (and maybe save a checkpoint) every this many iterations
log_interval = 10            # a log line every this many iterations
eval_iters = 50              # batches per loss estimate
eval_only = False            # evaluate once and exit
always_save_checkpoint = False  # save at every evaluation, not only when the val loss improves
init_from = 'scratch'        # 'scratch' or 'resume' (from out_dir/ckpt.pt)
wandb_log = False            # also send what log.jsonl records to Weights & Biases (pip install wandb)
wandb_project = 'tapa'
wandb_run_name = ''          # '' = the out_dir's name
# data
dataset = 'pycode'
tokenizer = 'byte'           # 'byte' or 'gpt2'
data_dir = ''                # '' = data/<dataset>/<tokenizer> in this repository
gradient_accumulation_steps = 1  # micro-batches per optimizer step (simulates a larger batch)
batch_size = 12              # sequences per micro-batch
block_size = 256             # the training context, in tokens
# model: every GPTConfig field but vocab_size (which the data decides) is a setting too, with
# GPTConfig's default (model.py explains each: pos_encoding, tapa_alpha, rope_scaling, ...), except:
n_layer = 6
n_head = 6
n_embd = 384
tapa_phase_warmup_iters = 0  # ramp TAPA's phase in linearly over the first this-many iterations (0 = off)
# AdamW
learning_rate = 1e-3         # the peak learning rate
max_iters = 5000             # optimizer steps in total
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0              # clip the gradient norm at this value (0 = off)
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 100
lr_decay_iters = 5000        # ~= max_iters, as in the Chinchilla paper
min_lr = 1e-4                # ~= learning_rate / 10
# system
device = 'auto'              # 'auto' (cuda > mps > cpu), or e.g. 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'               # 'auto' (bfloat16 where supported, else float16 on CUDA; float32 elsewhere)
compile = 'auto'             # torch.compile the model: True, False or 'auto' (= on CUDA GPUs where Triton runs)
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (bool, int, float, str, type(None)))]
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != 'vocab_size']
DEFAULTS = {**{k: globals()[k] for k in config_keys},
            **{f.name: f.default for f in fields(GPTConfig) if f.name in MODEL_KEYS and f.name not in config_keys}}
# what the settings whose type their default doesn't tell may also be (GPTConfig's: Optional[type])
OPTIONAL_TYPES = {'compile': bool, **{f.name: typing.get_args(f.type)[0] for f in fields(GPTConfig) if f.default is None}}
# the settings that shape the weights: a checkpoint's (or a given model's) values must win over them.
# dropout, attn_impl and activation_checkpointing may change (the same function, faster or leaner).
ARCH_KEYS = [k for k in MODEL_KEYS if k not in ('dropout', 'attn_impl', 'activation_checkpointing')]

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_SEED = 2024  # the fixed evaluation batches (see estimate_loss)


# -----------------------------------------------------------------------------
# settings

def check_settings(cfg):
    """Catch impossible settings before any work (preparing data, building the model) is done."""
    choices = {'init_from': ('scratch', 'resume'), 'compile': (True, False, 'auto'),
               'dtype': DTYPES, 'tokenizer': tuple(sorted(TOKENIZERS))}
    for k, allowed in choices.items():
        if cfg[k] not in allowed:
            raise ConfigError(f"{k}={cfg[k]!r} must be one of {allowed}")
    for k in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters', 'max_iters'):
        if cfg[k] < (0 if k == 'max_iters' else 1):
            raise ConfigError(f"{k}={cfg[k]} is too small (it must be at least {0 if k == 'max_iters' else 1})")

    # Ranges. Outside them, some settings train silently wrong (a negative min_lr makes the end of
    # the cosine schedule a negative learning rate: gradient ascent), others end in a traceback from
    # deep inside torch or numpy. The comparisons are written so that a NaN fails them too.
    def need(ok, key, rule, why):
        if not ok:
            raise ConfigError(f"{key}={cfg[key]!r} must be {rule} ({why})")
    # a learning rate of 0 is allowed: steps that change nothing (a test of the plumbing may want them)
    need(cfg.learning_rate >= 0, 'learning_rate', '>= 0', 'the peak learning rate; 0 changes nothing')
    need(cfg.warmup_iters >= 0, 'warmup_iters', '>= 0', '0 = no warmup')
    if cfg.pos_encoding == 'tapa':
        need(cfg.tapa_phase_warmup_iters >= 0, 'tapa_phase_warmup_iters', '>= 0', '0 = no ramp')
    if cfg.decay_lr:
        need(0 <= cfg.min_lr <= cfg.learning_rate, 'min_lr', f"within [0, learning_rate={cfg.learning_rate:g}]",
             'the schedule decays from learning_rate down to min_lr; learning_rate / 10 is usual')
        if cfg.lr_decay_iters <= cfg.warmup_iters:
            raise ConfigError(f"lr_decay_iters={cfg.lr_decay_iters} must be larger than warmup_iters={cfg.warmup_iters}")
    for k in ('beta1', 'beta2'):
        need(0 <= cfg[k] < 1, k, 'within [0, 1)', "AdamW's decay rates of its gradient averages; 0.9 and 0.95-0.999 are usual")
    need(cfg.weight_decay >= 0, 'weight_decay', '>= 0', '0 = none')
    need(cfg.grad_clip >= 0, 'grad_clip', '>= 0', 'the largest gradient norm; 0 = no clipping')
    need(0 <= cfg.seed < 2**32, 'seed', 'within [0, 2**32)', "numpy's seeds are 32-bit")
    need(cfg.out_dir != '', 'out_dir', 'a folder name', 'where ckpt.pt and log.jsonl are written')
    need(not os.path.isfile(cfg.out_dir), 'out_dir', 'a folder, not an existing file',
         'where ckpt.pt and log.jsonl are written')
    if cfg.pos_encoding in ('rope', 'xpos') and cfg.rope_scaling is None and cfg.rope_factor != 1.0:
        raise ConfigError(f"rope_factor={cfg.rope_factor:g} does nothing without a rope_scaling (pi, ntk, yarn): "
                          f"set one, or leave rope_factor at 1")
    if cfg.wandb_log and importlib.util.find_spec('wandb') is None:
        raise ConfigError("wandb_log=True needs the wandb package: pip install wandb (or drop --wandb_log)")
    try:  # the model's settings: model.check_config is their one validator
        check_config(GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}, vocab_size=1))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def resolve_config(overrides, defaults=DEFAULTS, optional_types=OPTIONAL_TYPES, model=None):
    """The full settings of a run: defaults < (on resume) the checkpoint's settings < overrides.
    On resume, and when a model is given, its architecture wins; an explicit setting that disagrees
    with it is an error rather than silently ignored. Returns (cfg, checkpoint or None)."""
    for key, value in overrides.items():
        if key not in defaults:
            raise unknown_key_error(key, defaults, 'passed to train()')
        overrides[key] = check_value(key, value, allowed_types(key, defaults, optional_types), 'passed to train()')
    cfg = Settings({**defaults, **overrides})
    checkpoint, arch, source = None, None, None
    if cfg.init_from == 'resume':
        if model is not None:
            raise ConfigError("init_from='resume' takes the model from the checkpoint; don't pass a model too")
        checkpoint = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))
        # the checkpoint's settings replace the defaults, so resuming needs no config file
        saved = {k: v for k, v in checkpoint['config'].items() if k in defaults}
        cfg = Settings({**defaults, **saved, **overrides, 'out_dir': cfg.out_dir, 'init_from': 'resume'})
        # the tokenizer is part of the model too (its embedding rows mean its tokens)
        arch = {**checkpoint['model_args'], 'tokenizer': checkpoint['config'].get('tokenizer')}
        source = f"the checkpoint {cfg.out_dir}/ckpt.pt"
    elif model is not None:
        arch, source = asdict(model.config), "the model passed to train()"
    if arch is not None:
        conflicts = [f"{k}={overrides[k]!r} (it has {arch[k]!r})" for k in ARCH_KEYS + ['tokenizer']
                     if k in overrides and k in arch and overrides[k] != arch[k]]
        if conflicts:
            raise ConfigError(f"these settings conflict with {source}: {', '.join(conflicts)}. "
                              f"Its architecture cannot change; drop them (or start a new out_dir)")
        cfg.update({k: arch[k] for k in ARCH_KEYS})
    check_settings(cfg)
    return cfg, checkpoint


# -----------------------------------------------------------------------------
# data: data/<dataset>/<tokenizer>/{train,validation}.bin, flat uint16 tokens (see data/common.py)

def find_data(cfg):
    """Check the prepared data (preparing pycode on first use) and return (data_dir, meta, bin paths)."""
    from data.common import load_split, read_meta
    data_dir = cfg.data_dir or os.path.join(REPO_ROOT, 'data', cfg.dataset, cfg.tokenizer)
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        if cfg.dataset == 'pycode' and not cfg.data_dir:  # built in: prepared on first use, in its own folder
            print(f"no prepared data in {data_dir}: preparing the pycode dataset "
                  f"({cfg.tokenizer} tokenizer) now, on first use")
            from data.pycode.prepare import prepare
            prepare(tokenizer=cfg.tokenizer, out_dir=data_dir)
        elif not cfg.data_dir and not os.path.exists(os.path.join(REPO_ROOT, 'data', cfg.dataset, 'prepare.py')):
            known = sorted(d for d in os.listdir(os.path.join(REPO_ROOT, 'data'))
                           if os.path.exists(os.path.join(REPO_ROOT, 'data', d, 'prepare.py')))
            raise TrainError(f"unknown dataset {cfg.dataset!r} (there is no data/{cfg.dataset}/prepare.py); "
                             f"the datasets are: {', '.join(known)}")
    try:  # read_meta and load_split check the files and name the prepare command if they are missing
        meta = read_meta(data_dir)
        lengths = {split: len(load_split(data_dir, split)[0]) for split in ('train', 'validation')}
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from e
    if meta['tokenizer'] != cfg.tokenizer:
        raise TrainError(f"{data_dir} holds {meta['tokenizer']} tokens but tokenizer={cfg.tokenizer!r}")
    for split, n in lengths.items():
        if n < cfg.block_size + 1:  # a window is block_size inputs plus the one token after them
            raise TrainError(f"the {split} split of {data_dir} has {n:,} tokens, too few for one window of "
                             f"block_size+1 = {cfg.block_size + 1:,}; lower block_size or use more data")
    paths = {split: os.path.join(data_dir, f'{split}.bin') for split in lengths}
    return data_dir, meta, paths, lengths


def get_batch(path, batch_size, block_size, generator, device, load=True):
    """batch_size windows of block_size+1 consecutive tokens at random places: x is the first
    block_size tokens of each, y the same shifted by one (the next token to predict at every position).
    Windows may span a document boundary (the EOT token between documents marks it). load=False: only
    draw the places (the generator moves on as if loaded) and return (None, None)."""
    # open the memmap anew for every batch: a long-lived np.memmap keeps growing in memory (nanoGPT's fix)
    data = np.memmap(path, dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    if not load:
        return None, None
    windows = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if device.type == 'cuda':
        # page-locked memory lets the copy to the GPU run in the background (non_blocking)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# optimizer, learning rate and evaluation

def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW; weight decay on matrices (2D params) only, never on biases, norms or gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    use_fused = device_type == 'cuda'  # the fused kernel is faster and exists on CUDA
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=use_fused)


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, cosine decay to min_lr until lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # goes from 1 to 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, paths, cfg, device, autocast, batch_source=None):
    """Mean loss over eval_iters batches of each split. The batches come from a generator with a fixed
    seed, made anew at each call: every evaluation of every run sees the *same* batches, so two val
    losses differ because the models differ, not because of sampling noise. It also leaves the
    training's random streams (batches, dropout) untouched, which an exact resume relies on.
    A batch_source (see train) gives batches k = 0..eval_iters-1 of each split: fixed batches too."""
    model.eval()  # no dropout, so no random draws here either
    out = {}
    for i, split in enumerate(('train', 'validation')):
        generator = torch.Generator().manual_seed(EVAL_SEED + i)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            if batch_source is None:
                X, Y = get_batch(paths[split], cfg.batch_size, cfg.block_size, generator, device)
            else:
                X, Y = (t.to(device) for t in batch_source(split, k, 0))
            with autocast:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# the training run

def train(overrides, model=None, defaults=DEFAULTS, optional_types=OPTIONAL_TYPES, batch_source=None, evaluate=None):
    """Run training with these settings (as returned by get_overrides; the rest are defaults).
    model: start from this model instead of a new one (iteration 0, a fresh optimizer); its
    architecture wins over the settings. defaults: a script that reuses this loop with settings of
    its own passes its defaults (a superset of DEFAULTS, with optional_types for those defaulting to
    None); they are saved in the checkpoint too.
    batch_source(split, iteration, micro_step) -> (x, y): the batches instead of the token files (a pure
    function of its arguments, so a resume needs no state of it); a new run then needs `model`, whose
    vocabulary is the source's. evaluate(model) -> dict: run at every evaluation, logged with the losses.
    Returns {'iter_num', 'best_val_loss', 'val_loss', 'model'}."""
    cfg, checkpoint = resolve_config(dict(overrides), defaults, optional_types, model)
    out_dir, gas = cfg.out_dir, cfg.gradient_accumulation_steps
    rank, world_size, device = init_distributed(cfg.device)  # one process, rank 0 of 1, without torchrun
    if gas % world_size:
        raise ConfigError(f"gradient_accumulation_steps={gas} is the number of micro-batches of a step in all "
                          f"processes together: it must be a multiple of the {world_size} processes")
    master = rank == 0  # only it prints, logs and writes checkpoints
    say = tqdm.write if master else (lambda *args, **kwargs: None)  # (tqdm.write: the progress bar stays whole)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.attn_impl == 'triton' and not str(device).startswith('cuda'):  # (say so now, not at the first step)
        raise ConfigError(f"attn_impl='triton' is a CUDA kernel and device={device}: use attn_impl='auto'")
    ckpt_path, log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'log.jsonl')

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # weight init and dropout
    # a generator of its own for picking training batches: the batch sequence is then a pure function
    # of the seed (dropout or evaluation draw nothing from it), and its state is easy to checkpoint
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: much faster, ample precision
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_for(device, dtype)  # mixed precision on GPUs (runtime.py: one policy for every script)

    paths = None  # with a batch_source there are no token files
    if batch_source is None:
        if world_size > 1 and not master:  # rank 0 prepares pycode on first use, alone; the others wait for it
            dist.barrier()
        data_dir, meta, paths, lengths = find_data(cfg)
        if world_size > 1 and master:
            dist.barrier()
    elif model is None and checkpoint is None:
        raise ConfigError("train(batch_source=...) needs a model to start from: a batch source has no vocab_size")
    # GPT-2's 50257 tokens padded up to a multiple of 64 (50304): faster matmuls, the extra rows go unused
    vocab_size = -(-meta['vocab_size'] // 64) * 64 if paths else None
    if checkpoint is not None:  # its vocab_size too (the other architecture settings are in cfg already)
        vocab_size = checkpoint['model_args']['vocab_size']
    if model is None:
        model = GPT(GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}, vocab_size=vocab_size))
    model.config.activation_checkpointing = cfg.activation_checkpointing  # (a given model takes this run's)
    if rank > 0:  # the same initial weights everywhere (seed above), but each rank its own dropout masks
        torch.manual_seed(cfg.seed + rank)
    if paths and model.config.vocab_size < meta['vocab_size']:
        raise TrainError(f"the model has {model.config.vocab_size} token embeddings but {data_dir} "
                         f"uses {meta['vocab_size']} tokens: it was trained with another tokenizer")
    model.to(device)
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none (no-op then)
    scaler = torch.amp.GradScaler('cuda', enabled=(dtype == 'float16'))
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate,
                                     (cfg.beta1, cfg.beta2), device.type)
    iter_num, best_val_loss, elapsed_before = 0, float('inf'), 0.0
    if checkpoint is not None:  # everything back as it was saved, random streams included (runtime.py)
        iter_num, best_val_loss, elapsed_before = restore_training(checkpoint, model, optimizer, scaler,
                                                                   batch_generator, device, cfg, rank, world_size)
        say(f"resuming from {ckpt_path} at iter {iter_num} (settings not given come from the checkpoint)")
        checkpoint = None  # free the memory
    use_compile = compiles_on(device) if cfg.compile == 'auto' else cfg.compile
    raw_model = model  # the plain module: its state_dict has no '_orig_mod.' prefixes
    if use_compile:
        model = torch.compile(model)
    eval_model = model  # evaluation runs on every rank outside DDP (whose buffer broadcasts would hang)
    if world_size > 1:  # gradients averaged over the processes, once per optimizer step (see below)
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)

    tokens_per_iter = gas * cfg.batch_size * cfg.block_size
    if cfg.decay_lr and cfg.max_iters < cfg.lr_decay_iters and not cfg.eval_only:
        say(f"note: max_iters={cfg.max_iters} ends before the learning rate has decayed (lr_decay_iters="
              f"{cfg.lr_decay_iters}); pass --lr_decay_iters={cfg.max_iters} for the whole schedule")
    say(f"device {device}, dtype {dtype}, compile {use_compile}, {world_size} process(es)")
    say(f"data {data_dir}: {lengths['train']:,} train / {lengths['validation']:,} validation tokens, "
        f"vocab {meta['vocab_size']} ({meta['tokenizer']})" if paths else "data: the batch source given to train()")
    say(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, {raw_model.config.pos_encoding}, "
          f"{raw_model.config.n_layer} layers, n_embd {raw_model.config.n_embd}, context {cfg.block_size}")
    say(f"tokens per iteration: {gas} x {cfg.batch_size} x {cfg.block_size} = {tokens_per_iter:,}")
    say(fast_attention.describe(raw_model, device, getattr(torch, dtype)))  # which implementation the attention runs

    def log(record):  # log.jsonl is the record of the run; wandb, when on, a mirror of it
        if master:
            with os_errors('append to', log_path), open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
            if wandb is not None:
                wandb.log({f"{record['kind']}/{k}": v for k, v in record.items() if k != 'kind'}, step=record['iter'])

    start_iter, resumed = iter_num, cfg.init_from == 'resume'
    saved_iter = iter_num if resumed else None  # the iteration of this run's checkpoint on disk

    def last_good():  # this run's, not a ckpt.pt an earlier run in this out_dir left (a new run replaces it)
        if saved_iter is None:
            return "this run had not saved a checkpoint yet"
        return f"{ckpt_path} (iter {saved_iter}) is the last good checkpoint"

    losses = {}
    t_start = time.time() - elapsed_before  # elapsed time carries on across resumes
    t_last, iters_since_log = time.time(), 0
    if resumed and iter_num >= cfg.max_iters and not cfg.eval_only:
        say(f"the checkpoint is at iter {iter_num}, max_iters is {cfg.max_iters}: nothing to do (raise --max_iters)")
    writes = master and not cfg.eval_only
    if writes:
        with os_errors('create the folder', out_dir):
            os.makedirs(out_dir, exist_ok=True)
    lock = lock_out_dir(out_dir) if writes else None  # one run per out_dir, released on any exit
    wandb = None
    if writes and cfg.wandb_log:
        import wandb  # (check_settings made sure it is there)
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
                   config=dict(cfg))
    bar = tqdm(total=cfg.max_iters, initial=min(iter_num, cfg.max_iters), unit='it', dynamic_ncols=True,
               mininterval=0.5, disable=not master)
    try:
        if resumed and writes:
            trim_log(log_path, iter_num)  # an interrupted run may have logged past its checkpoint
        elif writes:  # a new run: an earlier one here is kept as *.prev, not emptied or overwritten
            moved = set_aside_previous_run(out_dir)
            if moved:
                say(f"note: {out_dir} held a run, kept as {' and '.join(m + '.prev' for m in moved)} "
                      f"(--init_from=resume continues a run instead)")
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr
            if cfg.tapa_phase_warmup_iters > 0:  # a pure function of iter_num, so resume stays exact
                raw_model.set_tapa_phase_ramp(min(1.0, (iter_num + 1) / cfg.tapa_phase_warmup_iters))
            at_end = iter_num >= cfg.max_iters

            # evaluate; save when the val loss improved (or always_save_checkpoint), and at the end.
            # A resumed run skips the evaluation at its first iteration: it happened before the save.
            if cfg.eval_only or ((iter_num % cfg.eval_interval == 0 or at_end)
                                    and not (resumed and iter_num == start_iter)):
                losses = estimate_loss(eval_model, paths, cfg, device, autocast, batch_source)
                # every rank evaluated the same batches: their mean, so that all decide alike below
                losses = dict(zip(losses, mean_over_ranks(list(losses.values()), world_size, device)))
                say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['validation']:.4f}")
                if cfg.eval_only:
                    break
                if not math.isfinite(losses['validation']):
                    raise TrainError(f"the validation loss is {losses['validation']} at iter {iter_num}: training "
                                     f"diverged. Nothing was saved from this state; {last_good()}. Try a lower "
                                     f"learning_rate or a longer warmup")
                log({'kind': 'eval', 'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['validation'],
                     'lr': lr, **(evaluate(raw_model) if evaluate else {}), 'elapsed_s': round(time.time() - t_start, 3)})
                improved = losses['validation'] < best_val_loss
                best_val_loss = min(best_val_loss, losses['validation'])
                if iter_num > 0 and (improved or cfg.always_save_checkpoint or at_end):
                    rngs = gather_rng_states(rng_states(batch_generator, device), world_size)  # every rank's
                    if master:
                        save_checkpoint(training_checkpoint(raw_model, optimizer, scaler, cfg, iter_num, best_val_loss,
                                                            rngs, time.time() - t_start), out_dir)
                        say(f"saved {ckpt_path}")
                    saved_iter = iter_num
                t_last, iters_since_log = time.time(), 0  # evaluation time doesn't count towards tokens/s
            if at_end:
                break

            # one optimizer step over gradient_accumulation_steps micro-batches in all. Every rank draws
            # every micro-batch from the one batch generator and computes its own share (micro-steps
            # rank, rank + N, ...), so the tokens of a step are the same whatever the number of processes
            # N. The batches are drawn at the start of each micro-step (nanoGPT prefetches the next one):
            # the generator's state at the top of an iteration is then exactly what a checkpoint holds.
            mine = range(rank, gas, world_size)
            loss_sum = 0.0
            for micro_step in range(gas):
                if batch_source is None:
                    X, Y = get_batch(paths['train'], cfg.batch_size, cfg.block_size, batch_generator, device,
                                     load=micro_step in mine)
                else:  # a pure function of the step: no state to save, and other ranks' batches need no drawing
                    X, Y = batch_source('train', iter_num, micro_step) if micro_step in mine else (None, None)
                if X is None:
                    continue  # another rank's
                X, Y = X.to(device), Y.to(device)  # (a no-op for get_batch's)
                if world_size > 1:  # DDP averages the gradients over the ranks once, at the last of them
                    model.require_backward_grad_sync = micro_step == mine[-1]
                with autocast:
                    _, loss = model(X, Y)
                loss_sum = loss_sum + loss.detach()
                # the mean loss over this rank's micro-batches; DDP's average over the ranks makes it the
                # mean over all of them (one process: loss / gas, as without DDP)
                scaler.scale(loss / len(mine)).backward()
            # one GPU sync per iteration: the price of stopping at the first bad step, before it is applied
            loss_value, = mean_over_ranks([loss_sum.item() / len(mine)], world_size, device)
            if not math.isfinite(loss_value):
                raise TrainError(f"the loss is {loss_value} at iter {iter_num}: training diverged. Stopped before "
                                 f"applying this step and saved nothing; {last_good()}. Try a lower learning_rate "
                                 f"(peak {cfg.learning_rate:g}) or a longer warmup")
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # free the gradients' memory right away

            iters_since_log += 1
            if iter_num % cfg.log_interval == 0:
                now = time.time()
                tokens_per_s = tokens_per_iter * iters_since_log / max(now - t_last, 1e-9)
                t_last, iters_since_log = now, 0
                log({'kind': 'train', 'iter': iter_num, 'loss': loss_value, 'lr': lr,
                     'tokens_per_s': round(tokens_per_s, 1), 'elapsed_s': round(now - t_start, 3)})
                bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}', tok_s=f'{tokens_per_s:,.0f}')
            iter_num += 1
            bar.update(1)
    except KeyboardInterrupt:
        # say what there is to continue from: saves come only with evaluations (when the val loss improved)
        if saved_iter is None:
            raise KeyboardInterrupt(f"interrupted at iter {iter_num}, before this run saved a checkpoint (it saves "
                                    f"at evaluations, every eval_interval={cfg.eval_interval} iters): nothing "
                                    f"to continue from; run it again") from None
        raise KeyboardInterrupt(f"interrupted at iter {iter_num}: continue from the last checkpoint, {ckpt_path} "
                                f"at iter {saved_iter}, with --init_from=resume (same --out_dir)") from None
    finally:
        bar.close()
        if wandb is not None:
            wandb.finish()
        if lock is not None:
            lock.close()
    if world_size > 1:  # DDP's reducer holds the process group: freed after it, its destructor hangs
        model = eval_model = None
        dist.destroy_process_group()
    return {'iter_num': iter_num, 'best_val_loss': best_val_loss, 'val_loss': losses.get('validation'),
            'model': raw_model}


if __name__ == '__main__':
    try:
        train(get_overrides(DEFAULTS, sys.argv[1:], OPTIONAL_TYPES, doc=__doc__))  # -h: usage and settings
    except (ConfigError, TrainError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # train() says what there is to continue from
        sys.exit(f"\n{e or 'interrupted'}")
