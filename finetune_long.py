"""
Long-context fine-tuning: take a pretrained checkpoint, raise its context to `factor` times the length
it was trained at, apply a RoPE context-extension method if asked, and fine-tune it lightly on windows
of the new length.

    python finetune_long.py --init_dir=out-tiny-tapa                       # TAPA: only the context grows
    python finetune_long.py --init_dir=out-tiny-rope --rope_scaling=pi     # Position Interpolation
    python finetune_long.py --init_dir=out-tiny-rope --rope_scaling=yarn   # YaRN (rope_factor = factor)
    python finetune_long.py --init_dir=out-tiny-rope --rope_base=5e5       # ABF: a larger RoPE base
    python finetune_long.py configs/finetune/tiny.py --init_dir=out-tiny-rope --rope_scaling=yarn
    python finetune_long.py --out_dir=out-tiny-rope-ft4x-yarn --init_from=resume   # continue an interrupted run

What each positional encoding needs to run at a longer context:
  - TAPA, ALiBi, NoPE: nothing. They have no per-position parameters and no trained angle range,
    so fine-tuning is only training on longer windows. (TAPA's claim is that this is enough.)
  - RoPE: a context-extension method, or it meets rotation angles it never saw in training:
      --rope_scaling=pi|ntk|yarn   with rope_factor = new context / pretraining context by default
      --rope_scaling=dynamic_ntk   rope_factor stays 1 by default: its scale already follows the
                                   current length (s = length / pretraining context), see model.py
      --rope_base=5e5              ABF, "adjusted base frequency" (can be combined with a scaling)
    With none of them it is fine-tuned as it is (plain RoPE, the baseline the methods improve on).
  - learned: there is no embedding for the new positions. That is an error unless
    --interpolate_learned=True, which stretches the table linearly (model.extend_learned).

The fine-tuning is train.py's training loop itself (train.train(settings, model=...)): the same
data pipeline, learning rate schedule, evaluation, atomic checkpoints, log.jsonl and exact resume.
The checkpoint it writes is an ordinary train.py checkpoint whose model_args hold the new block_size
and the extension (rope_scaling, rope_factor, rope_original_block_size = the pretraining context,
rope_base), so eval_ppl.py, eval_passkey.py and sample.py apply it with no flag. Its config also
records init_ckpt, factor and pretrained_block_size. The pretrained checkpoint is only read: the run
writes to a new out_dir (default: <pretrained out_dir>-ft<factor>x[-<method>]).

Defaults, in the spirit of the light fine-tuning of PI (Chen et al. 2023: 1000 steps, 20 warmup,
lr ~1/15 of LLaMA's pretraining peak), YaRN (Peng et al. 2023: 400 steps, 20 warmup, no weight decay)
and the TAPA paper ("light fine-tuning"): 400 steps, 20 warmup steps, a peak learning rate of
lr_scale = 1/10 of the pretraining peak, cosine decay to a tenth of that, no weight decay, and the
same tokens per step as pretraining (batch_size shrinks as the windows grow). Every setting not
given is otherwise taken from the pretrained run (data, tokenizer, betas, grad_clip, device...).
"""

import dataclasses
import math
import os
import sys

import runtime
import train
from configurator import ConfigError, get_overrides
from model import PE_TABLE, check_config

# -----------------------------------------------------------------------------
# fine-tuning's own settings
init_ckpt = ''               # the pretrained checkpoint (a ckpt.pt path) ...
init_dir = ''                # ... or the out_dir that holds it
factor = 4.0                 # the new context is factor x the pretrained block_size
lr_scale = 0.1               # peak learning rate = lr_scale x the pretraining peak (unless learning_rate is given)
interpolate_learned = False  # learned position embeddings: stretch the table to the new length
pretrained_block_size = 0    # recorded in the checkpoint's config (set by this script, not by you)
# train.py's settings whose fine-tuning defaults differ from pretraining. learning_rate, min_lr and
# batch_size are derived (see above) unless given; the others not listed here come from the
# pretrained run (INHERITED) or train.py's defaults.
out_dir = ''                 # '' = <pretrained out_dir>-ft<factor>x[-<method>]
max_iters = 400
warmup_iters = 20
lr_decay_iters = 0           # 0 = max_iters
weight_decay = 0.0
eval_interval = 100
# -----------------------------------------------------------------------------
FT_KEYS = ['init_ckpt', 'init_dir', 'factor', 'lr_scale', 'interpolate_learned', 'pretrained_block_size']
DEFAULTS = {**train.DEFAULTS,
            **{k: globals()[k] for k in FT_KEYS + ['out_dir', 'max_iters', 'warmup_iters', 'lr_decay_iters',
                                                   'weight_decay', 'eval_interval']}}
OPTIONAL_TYPES = train.OPTIONAL_TYPES
# what the pretrained run decides when not given here
INHERITED = ['dataset', 'tokenizer', 'data_dir', 'gradient_accumulation_steps', 'beta1', 'beta2', 'grad_clip',
             'eval_iters', 'log_interval', 'device', 'dtype', 'compile', 'seed', 'decay_lr']
# the extension settings a RoPE model may take (they are GPTConfig fields, applied by change_context)
ROPE_KEYS = ['rope_scaling', 'rope_factor', 'rope_base', 'yarn_beta_fast', 'yarn_beta_slow']


def pretrained_path(cfg):
    """The pretrained ckpt.pt from --init_ckpt or --init_dir (exactly one of them)."""
    if not cfg['init_ckpt'] and not cfg['init_dir']:
        raise ConfigError("which model? pass --init_dir=<out_dir of a train.py run> or --init_ckpt=<path/to/ckpt.pt>")
    paths = set()
    if cfg['init_ckpt']:
        paths.add(os.path.abspath(cfg['init_ckpt']))
    if cfg['init_dir']:
        paths.add(os.path.abspath(os.path.join(cfg['init_dir'], 'ckpt.pt')))
    if len(paths) > 1:
        raise ConfigError(f"--init_ckpt={cfg['init_ckpt']} and --init_dir={cfg['init_dir']} name different "
                          f"checkpoints; pass one of them")
    path = paths.pop()
    if cfg['init_dir'] and os.path.isfile(cfg['init_dir']):
        raise ConfigError(f"--init_dir={cfg['init_dir']} is a file: --init_dir takes the folder that holds "
                          f"ckpt.pt, --init_ckpt the file itself")
    if cfg['init_ckpt'] and os.path.isdir(cfg['init_ckpt']):
        raise ConfigError(f"--init_ckpt={cfg['init_ckpt']} is a folder: --init_ckpt takes the checkpoint file, "
                          f"--init_dir the folder that holds ckpt.pt")
    if not os.path.isfile(path):
        raise ConfigError(f"no pretrained checkpoint at {path}: train one first (python train.py "
                          f"configs/tiny_tapa.py), then pass its out_dir as --init_dir")
    return path


def change_context(model, block_size, interpolate_learned=False, **pe_overrides):
    """Raise the context to block_size and apply config overrides (e.g. rope_scaling='yarn',
    rope_factor=4) for long-context fine-tuning or evaluation; the encoding's `extend` runs first."""
    cfg, pe = model.config, PE_TABLE[model.config.pos_encoding]
    unknown = [key for key in pe_overrides if not hasattr(cfg, key)]
    if unknown:
        raise ValueError(f"change_context: unknown config field {unknown[0]!r}")
    check_config(dataclasses.replace(cfg, **pe_overrides))  # before anything changes: no half-changed model
    if pe.extend:
        pe.extend(model, block_size, interpolate_learned=interpolate_learned)
    for key, value in pe_overrides.items():
        setattr(cfg, key, value)
    cfg.block_size = block_size


def extension_settings(config, overrides, new_block_size):
    """The GPTConfig changes that extend this model's context, for change_context: none for TAPA,
    ALiBi, NoPE and learned; for RoPE the scaling method, its factor and the base asked for."""
    asked = {k: overrides[k] for k in ROPE_KEYS if k in overrides}
    if 'rope_scaling' in asked and str(asked['rope_scaling']).lower() == 'none':
        asked['rope_scaling'] = None
    if config.pos_encoding != 'rope':
        if asked:
            raise ConfigError(f"{', '.join('--' + k for k in asked)} extend RoPE models only; this is a "
                              f"{config.pos_encoding} model, which needs nothing but the longer context: drop them")
        return {}
    changes = dict(asked)
    scaling = changes.get('rope_scaling', config.rope_scaling)
    original = config.rope_original_block_size or config.block_size  # the *pretraining* context
    if scaling in ('pi', 'ntk', 'yarn') and 'rope_factor' not in changes:
        # these scale relative to the pretraining context: reaching new_block_size takes this factor
        # (= factor, unless the checkpoint was already extended once)
        changes['rope_factor'] = new_block_size / original
    return changes


def method_name(config, changes):
    """A short tag for the default out_dir: 'pi', 'yarn', 'abf', 'yarn-abf', ... ('' = none)."""
    if config.pos_encoding != 'rope':
        return 'interp' if config.pos_encoding == 'learned' else ''
    parts = []
    if changes.get('rope_scaling', config.rope_scaling):
        parts.append(changes.get('rope_scaling', config.rope_scaling))
    if 'rope_base' in changes and changes['rope_base'] != config.rope_base:
        parts.append('abf')
    return '-'.join(parts)


def describe_extension(config):
    if config.pos_encoding != 'rope':
        return f"{config.pos_encoding}, block_size {config.block_size}"
    return (f"rope, block_size {config.block_size}, rope_scaling {config.rope_scaling}, rope_factor "
            f"{config.rope_factor:g}, rope_base {config.rope_base:g}, rope_original_block_size "
            f"{config.rope_original_block_size}")


def check_resume(overrides):
    """On resume everything comes from <out_dir>/ckpt.pt; fine-tuning settings given again must agree."""
    if not overrides.get('out_dir'):
        raise ConfigError("--init_from=resume continues the fine-tune in --out_dir: pass it")
    saved = runtime.load_checkpoint(os.path.join(overrides['out_dir'], 'ckpt.pt'))['config']
    if not saved.get('init_ckpt'):  # resuming it here would go on pretraining, into the pretrained checkpoint
        raise ConfigError(f"{overrides['out_dir']}/ckpt.pt is a pretraining run (train.py), not a fine-tune: "
                          f"continue it with python train.py --init_from=resume --out_dir={overrides['out_dir']}, "
                          f"or fine-tune it with --init_dir={overrides['out_dir']} (a new --out_dir is made for it)")
    differ = [f"--{k}={overrides[k]!r} (it has {saved.get(k)!r})" for k in FT_KEYS
              if k in overrides and k not in ('init_ckpt', 'init_dir') and overrides[k] != saved.get(k)]
    if overrides.get('init_ckpt') or overrides.get('init_dir'):  # the same command again, + --init_from=resume
        path = pretrained_path({**DEFAULTS, **overrides})
        if path != saved.get('init_ckpt'):
            differ.append(f"the pretrained checkpoint {path} (it started from {saved.get('init_ckpt')})")
    if differ:
        raise ConfigError(f"these settings differ from the fine-tune being resumed: {', '.join(differ)}; "
                          f"drop them (or start a new out_dir)")


def finetune(overrides):
    """Fine-tune with these settings (as returned by get_overrides). Returns train.train's result."""
    if overrides.get('init_from') == 'resume':
        check_resume(overrides)
        # the checkpoint's model (with its raised context) and settings, as in any train.py resume
        return train.train(overrides, defaults=DEFAULTS, optional_types=OPTIONAL_TYPES)
    given = dict(overrides)
    if 'block_size' in given:
        raise ConfigError("the new context is factor x the pretrained block_size: set --factor, not --block_size")
    cfg = {**DEFAULTS, **given}
    if not 1 <= cfg['factor'] < math.inf:
        raise ConfigError(f"factor={cfg['factor']} must be >= 1 and finite (this script raises the context)")
    if not cfg['lr_scale'] >= 0:
        raise ConfigError(f"lr_scale={cfg['lr_scale']} must be >= 0 (the fine-tuning peak is lr_scale x the "
                          f"pretraining peak)")
    ckpt_path = pretrained_path(cfg)
    checkpoint = runtime.load_checkpoint(ckpt_path)
    pre = checkpoint['config']
    model = runtime.model_from_checkpoint(checkpoint)
    del checkpoint  # its optimizer state is of no use: fine-tuning starts a fresh AdamW
    mc = model.config
    old, new = mc.block_size, int(round(cfg['factor'] * mc.block_size))
    for k in ('tokenizer', 'dropout'):  # part of the pretrained model: cannot change here
        have = pre.get(k) if k == 'tokenizer' else mc.dropout
        if k in given and have is not None and given[k] != have:
            raise ConfigError(f"--{k}={given[k]!r}: the pretrained model has {k} {have!r}, which fine-tuning keeps")

    # raise the context (and apply the extension), before any data is read or any step is taken
    changes = extension_settings(mc, given, new)
    if mc.pos_encoding == 'rope' and not changes and not mc.rope_scaling:
        print("note: no --rope_scaling or --rope_base given: fine-tuning plain RoPE at the longer context "
              "(the baseline that PI, YaRN and ABF improve on)")
    tag = method_name(mc, changes)  # before change_context, which writes the changes into mc
    if 'attn_impl' in given:  # how attention is computed may change (same function)
        changes['attn_impl'] = given['attn_impl']
    try:
        change_context(model, new, interpolate_learned=cfg['interpolate_learned'], **changes)
    except ValueError as e:
        hint = " (--interpolate_learned=True)" if mc.pos_encoding == 'learned' else ""
        raise ConfigError(f"cannot extend {ckpt_path}: {e}{hint}") from e

    # the run's settings: given > fine-tuning defaults and derived values > the pretrained run's.
    # The model decides the architecture; other model settings given are passed on so that train.py
    # refuses any that disagree with it (e.g. --n_layer=8).
    run = {k: v for k, v in cfg.items() if k not in train.MODEL_KEYS}
    run.update({k: v for k, v in given.items()
                if k in train.MODEL_KEYS and k not in ROPE_KEYS + ['attn_impl', 'dropout']})
    for k in INHERITED:
        if k not in given and k in pre:
            run[k] = pre[k]
    pre_batch = pre.get('batch_size', train.DEFAULTS['batch_size'])
    if 'batch_size' not in given:  # as many tokens per step as in pretraining
        run['batch_size'] = max(1, round(pre_batch * old / new))
    if 'learning_rate' not in given:
        run['learning_rate'] = cfg['lr_scale'] * pre.get('learning_rate', train.DEFAULTS['learning_rate'])
    if 'min_lr' not in given:
        run['min_lr'] = run['learning_rate'] / 10
    if not run['lr_decay_iters']:
        run['lr_decay_iters'] = max(run['max_iters'], run['warmup_iters'] + 1)
    if not run['out_dir']:
        base = os.path.dirname(ckpt_path) if not cfg['init_dir'] else cfg['init_dir'].rstrip('/\\')
        run['out_dir'] = f"{base}-ft{cfg['factor']:g}x" + (f"-{tag}" if tag else '')
    if os.path.abspath(os.path.join(run['out_dir'], 'ckpt.pt')) == ckpt_path:
        raise ConfigError(f"out_dir={run['out_dir']} holds the pretrained checkpoint; fine-tuning writes to a new "
                          f"out_dir (drop --out_dir for the default <out_dir>-ft<factor>x)")
    run.update(init_ckpt=ckpt_path, pretrained_block_size=old,
               dropout=mc.dropout, attn_impl=mc.attn_impl, init_from='scratch')
    print(f"fine-tuning {ckpt_path}: context {old} -> {new} ({describe_extension(mc)})")
    print(f"  {run['max_iters']} steps, peak lr {run['learning_rate']:.3g} (warmup {run['warmup_iters']}, "
          f"cosine to {run['min_lr']:.3g}), batch {run['batch_size']} x {new} tokens, writing to {run['out_dir']}")
    result = train.train(run, model=model, defaults=DEFAULTS, optional_types=OPTIONAL_TYPES)
    print(f"done: {run['out_dir']}/ckpt.pt ({describe_extension(result['model'].config)})")
    print(f"evaluate it: python eval_ppl.py --ckpt={ckpt_path},{run['out_dir']}")
    return result


if __name__ == '__main__':
    try:
        finetune(get_overrides(DEFAULTS, sys.argv[1:], OPTIONAL_TYPES, doc=__doc__))  # -h: usage and settings
    except (ConfigError, runtime.TrainError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # train.train() says what there is to continue from
        sys.exit(f"\n{e or 'interrupted'}")
