"""Checks of finetune_long.py and experiments/paper_in_miniature.py: fine-tuning runs of a few steps
from tiny checkpoints trained here with train.py, on token files written here. The extension a
fine-tune records is checked by what it does to the RoPE angles (against the published formulas),
that the evaluation scripts apply it by a direct computation of the loss, and resume bit for bit."""
import csv
import hashlib
import importlib.util
import json
import math
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import eval_ppl  # noqa: E402
import finetune_long  # noqa: E402
import paper_in_miniature  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)
HAS_MATPLOTLIB = importlib.util.find_spec('matplotlib') is not None

# pretrained at context 16: head dim 16, so 8 RoPE pairs
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, eval_iters=2, eval_interval=6,
            warmup_iters=2, lr_decay_iters=6, max_iters=6, learning_rate=5e-3, min_lr=1e-3, device='cpu',
            log_interval=1)
# a fine-tune of a few steps
FT = dict(max_iters=3, warmup_iters=1, eval_interval=3, eval_iters=2)


def make_data(folder, n_docs=(8, 4), doc_len=1200):
    """Prepared byte-level data (the contract's format) written with numpy: this repository's own
    source as text, several documents per split (train, validation and, given a third count, test),
    each followed by the EOT token 0."""
    text = b''.join(open(os.path.join(REPO, f), 'rb').read() for f in ('model.py', 'train.py', 'eval_ppl.py'))
    text = text.replace(b'\x00', b'')
    os.makedirs(folder, exist_ok=True)
    pos, splits = 0, {}
    for split, n in zip(('train', 'validation', 'test'), n_docs):
        docs = [np.append(np.frombuffer(text[pos + i * doc_len:pos + (i + 1) * doc_len], dtype=np.uint8), 0)
                for i in range(n)]
        pos += n * doc_len
        tokens = np.concatenate(docs).astype(np.uint16)
        tokens.tofile(os.path.join(folder, f'{split}.bin'))
        np.save(os.path.join(folder, f'{split}.docs.npy'), np.cumsum([0] + [len(d) for d in docs]).astype(np.int64))
        splits[split] = {'tokens': int(len(tokens)), 'docs': n}
    meta = {'dataset': 'tiny', 'tokenizer': 'byte', 'vocab_size': 256, 'eot_token': 0, 'dtype': 'uint16',
            'splits': splits, 'source': 'test'}
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(folder)


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('data') / 'tiny' / 'byte')


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, data_dir):
    """pos_encoding -> out_dir of a 6-step train.py run at context 16."""
    root = tmp_path_factory.mktemp('pretrained')
    dirs = {}
    for pe in ('rope', 'tapa', 'learned'):
        dirs[pe] = str(root / pe)
        train.train({**TINY, 'pos_encoding': pe, 'data_dir': data_dir, 'out_dir': dirs[pe]})
    return dirs


def load(out_dir):
    return runtime.load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))


def rope_angles(out_dir, T):
    """cos and sin (T, 8) of the model loaded from a checkpoint, as every script loads it."""
    model = runtime.model_from_checkpoint(load(out_dir))
    return model.pe_tables(T, torch.device('cpu'))


# ---------------------------------------------------------------------------
# the extension is applied and recorded


@pytest.mark.parametrize('method', ['pi', 'yarn', 'abf'])
def test_rope_finetune_records_its_extension(tmp_path, pretrained, method):
    src = pretrained['rope']
    before = sha256(os.path.join(src, 'ckpt.pt'))
    ext = {'pi': {'rope_scaling': 'pi'}, 'yarn': {'rope_scaling': 'yarn'}, 'abf': {'rope_base': 5e5}}[method]
    out = str(tmp_path / 'ft')
    result = finetune_long.finetune({'init_dir': src, 'out_dir': out, **FT, **ext})
    assert result['iter_num'] == 3
    ckpt = load(out)
    args, cfg = ckpt['model_args'], ckpt['config']
    assert args['block_size'] == cfg['block_size'] == 64  # factor 4 (the default) x 16
    assert args['rope_original_block_size'] == 16
    expected = {'pi': ('pi', 4.0, 1e4), 'yarn': ('yarn', 4.0, 1e4), 'abf': (None, 1.0, 5e5)}[method]
    assert (args['rope_scaling'], args['rope_factor'], args['rope_base']) == expected
    assert cfg['init_ckpt'] == os.path.abspath(os.path.join(src, 'ckpt.pt'))
    assert cfg['pretrained_block_size'] == 16 and cfg['factor'] == 4
    assert cfg['batch_size'] == 2  # 8 x 16 tokens per step, as in pretraining: 2 windows of 64
    assert cfg['learning_rate'] == pytest.approx(0.1 * TINY['learning_rate'])  # lr_scale
    assert cfg['data_dir'] == load(src)['config']['data_dir']  # inherited from the pretrained run
    # the pretrained checkpoint is untouched, and the fine-tune did train
    assert sha256(os.path.join(src, 'ckpt.pt')) == before
    w0, w1 = load(src)['model'], ckpt['model']
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)

    # the angles of the loaded model follow the method's formula (head dim D = 16, pairs i = 0..7)
    cos, sin = rope_angles(out, 64)
    p = torch.arange(64, dtype=torch.float64)[:, None]
    w = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)  # base^(-2i/D)
    if method == 'pi':  # every frequency / 4: position 4p looks like position p did in pretraining
        cos0, sin0 = rope_angles(src, 16)
        assert torch.allclose(cos[0::4], cos0, atol=1e-5) and torch.allclose(sin[0::4], sin0, atol=1e-5)
    elif method == 'abf':  # base 5e5
        w_abf = 5e5 ** (-torch.arange(8, dtype=torch.float64) / 8)
        assert torch.allclose(cos.double(), torch.cos(p * w_abf), atol=1e-4)
    else:  # YaRN: cos and sin scaled by 0.1 ln(4) + 1 (q.k by its square, the softmax temperature), and
        # a ramp over the pair index from floor(d(32)) to ceil(d(1)), d(r) = D ln(16 / (2 pi r)) / (2 ln 1e4)
        # the pair index that turns r times in the original 16 tokens: d(32) = -2.2, d(1) = 0.81, so the
        # ramp runs from 0 to 1: pair 0 keeps its frequency, pairs 1..7 are divided by 4 (interpolated)
        scale = 0.1 * math.log(4) + 1
        assert cos[0, 0].item() == pytest.approx(scale, rel=1e-6)
        w_yarn = torch.cat([w[:1], w[1:] / 4])
        assert torch.allclose(sin.double() / scale, torch.sin(p * w_yarn), atol=1e-4)
        assert torch.allclose(cos.double() / scale, torch.cos(p * w_yarn), atol=1e-4)


def test_tapa_finetune_changes_only_the_context(tmp_path, pretrained):
    out = str(tmp_path / 'ft')
    finetune_long.finetune({'init_dir': pretrained['tapa'], 'out_dir': out, 'factor': 2, **FT})
    args = load(out)['model_args']
    before = load(pretrained['tapa'])['model_args']
    assert args['block_size'] == 32
    assert {k: v for k, v in args.items() if k != 'block_size'} == {k: v for k, v in before.items() if k != 'block_size'}
    assert args['rope_scaling'] is None and args['rope_original_block_size'] is None


@pytest.mark.parametrize('ext, tag', [({'rope_scaling': 'yarn'}, 'yarn'), ({'rope_base': 5e5}, 'abf'),
                                      ({'rope_scaling': 'yarn', 'rope_base': 5e5}, 'yarn-abf'), ({}, '')])
def test_default_out_dir_names_the_method(tmp_path, pretrained, ext, tag):
    # the README's commands evaluate out-tiny-rope-ft4x-abf etc.: each method gets its own folder
    # (a YaRN + ABF run must not overwrite the plain YaRN one)
    import shutil
    src = str(tmp_path / 'out-rope')
    shutil.copytree(pretrained['rope'], src)
    finetune_long.finetune({'init_dir': src, **ext, **FT})
    out = src + '-ft4x' + (f'-{tag}' if tag else '')
    assert sorted(os.listdir(tmp_path)) == sorted(['out-rope', os.path.basename(out)])
    args = load(out)['model_args']
    assert args['rope_scaling'] == ext.get('rope_scaling') and args['rope_base'] == ext.get('rope_base', 10000.0)


# ---------------------------------------------------------------------------
# the evaluation scripts (and sample.py, through model_from_checkpoint) apply it


def test_eval_ppl_applies_the_recorded_extension(tmp_path, pretrained, data_dir):
    out = str(tmp_path / 'ft')
    finetune_long.finetune({'init_dir': pretrained['rope'], 'out_dir': out, 'rope_scaling': 'yarn', **FT})
    # a model this briefly trained barely uses position: give it random q, k, v weights large enough
    # that the RoPE angles change the loss visibly (any weights serve to check how it is loaded; its own
    # ones scaled up were tried first, but how much they use position depends on the tiny run's text)
    ckpt = load(out)
    g = torch.Generator().manual_seed(0)
    ckpt['model'] = {k: torch.randn(v.shape, generator=g) * 0.5 if k.endswith('c_attn.weight') else v
                     for k, v in ckpt['model'].items()}
    torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
    config = {**eval_ppl.default_config(), 'ckpt': out, 'lengths': '64', 'stride': 64, 'max_docs': 1,
              'protocol': 'sliding',
              'max_tokens_per_length': 64, 'quiet': True, 'out': str(tmp_path / 'ppl'),
              'device': 'cpu'}  # as the float32 CPU computation below (a GPU would evaluate in bfloat16)
    results = eval_ppl.evaluate(config, log=lambda *a: None)
    entry = results['models'][0]
    assert entry['model_args']['rope_scaling'] == 'yarn' and entry['model_args']['rope_factor'] == 4.0
    assert entry['trained_block_size'] == 64
    # one window of the first validation document's first 64 predictions, computed directly
    tokens = np.fromfile(os.path.join(data_dir, 'validation.bin'), dtype=np.uint16)[:65].astype(np.int64)
    x, y = torch.from_numpy(tokens[:-1])[None], torch.from_numpy(tokens[1:])

    def loss_with(**cfg_changes):
        model = GPT(GPTConfig(**{**ckpt['model_args'], **cfg_changes}))
        model.load_state_dict(ckpt['model'])
        with torch.no_grad():
            return F.cross_entropy(model(x, y)[0][0], y).item()
    assert entry['results']['64']['tokens'] == 64
    assert entry['results']['64']['loss'] == pytest.approx(loss_with(), rel=1e-5)
    assert abs(loss_with(rope_scaling=None) - loss_with()) > 1e-3  # so the match above is not trivial
    # what sample.py and eval_passkey.py load (runtime.model_from_checkpoint, eval_ppl.load_models)
    assert runtime.model_from_checkpoint(ckpt).config.rope_scaling == 'yarn'
    assert eval_ppl.load_models([os.path.join(out, 'ckpt.pt')], config, log=lambda *a: None)[0]['model'].config.rope_original_block_size == 16


# ---------------------------------------------------------------------------
# learned position embeddings


def test_learned_needs_interpolation(tmp_path, pretrained):
    out = tmp_path / 'ft'
    with pytest.raises(ConfigError, match='interpolate_learned=True'):
        finetune_long.finetune({'init_dir': pretrained['learned'], 'out_dir': str(out), **FT})
    assert not out.exists()  # refused before writing anything


def test_learned_interpolation_stretches_the_table(tmp_path, pretrained):
    out = str(tmp_path / 'ft')
    finetune_long.finetune({'init_dir': pretrained['learned'], 'out_dir': out, 'interpolate_learned': True,
                            **FT, 'learning_rate': 0.0, 'min_lr': 0.0})  # steps that change nothing
    old = load(pretrained['learned'])['model']['transformer.wpe.weight']
    new = load(out)['model']['transformer.wpe.weight']
    assert new.shape == (64, 32) and load(out)['model_args']['block_size'] == 64
    # linear, ends aligned: new position j sits at old position j * 15 / 63; j = 21 -> 5, j = 42 -> 10
    for j, i in ((0, 0), (21, 5), (42, 10), (63, 15)):
        assert torch.allclose(new[j], old[i], atol=1e-6)
    assert torch.allclose(new[1], old[0] + (old[1] - old[0]) * 15 / 63, atol=1e-6)


# ---------------------------------------------------------------------------
# bad input, resume, the command line


def test_bad_input(tmp_path, pretrained):
    with pytest.raises(ConfigError, match='RoPE models only'):
        finetune_long.finetune({'init_dir': pretrained['tapa'], 'out_dir': str(tmp_path / 'a'), 'rope_scaling': 'yarn'})
    with pytest.raises(ConfigError, match='holds the pretrained checkpoint'):
        finetune_long.finetune({'init_dir': pretrained['rope'], 'out_dir': pretrained['rope'], **FT})
    with pytest.raises(ConfigError, match='--factor'):
        finetune_long.finetune({'init_dir': pretrained['rope'], 'out_dir': str(tmp_path / 'b'), 'block_size': 64})
    with pytest.raises(ConfigError, match='--init_dir'):
        finetune_long.finetune({'out_dir': str(tmp_path / 'c')})
    with pytest.raises(ConfigError, match='no pretrained checkpoint'):
        finetune_long.finetune({'init_dir': str(tmp_path / 'nothing')})
    ckpt = os.path.join(pretrained['rope'], 'ckpt.pt')  # the file and the folder, each in the other's place
    with pytest.raises(ConfigError, match=r'--init_dir=.*ckpt\.pt is a file: --init_dir takes the folder'):
        finetune_long.finetune({'init_dir': ckpt, 'out_dir': str(tmp_path / 'e')})
    with pytest.raises(ConfigError, match=r'--init_ckpt=.* is a folder: --init_ckpt takes the checkpoint file'):
        finetune_long.finetune({'init_ckpt': pretrained['rope'], 'out_dir': str(tmp_path / 'e')})
    for bad, message in (({'factor': float('inf')}, 'must be >= 1 and finite'), ({'lr_scale': -1.0}, 'lr_scale=-1.0')):
        with pytest.raises(ConfigError, match=message):
            finetune_long.finetune({'init_dir': pretrained['rope'], 'out_dir': str(tmp_path / 'e'), **bad})
    with pytest.raises(ConfigError, match='n_layer'):  # the architecture is the pretrained model's
        finetune_long.finetune({'init_dir': pretrained['rope'], 'out_dir': str(tmp_path / 'd'), 'n_layer': 3, **FT})
    # --init_from=resume on a pretraining run: it would go on pretraining, over the pretrained checkpoint
    before = load(pretrained['rope'])['iter_num']
    with pytest.raises(ConfigError, match=r'is a pretraining run \(train\.py\), not a fine-tune: continue it with '
                                          r'python train\.py --init_from=resume'):
        finetune_long.finetune({'out_dir': pretrained['rope'], 'init_from': 'resume', 'max_iters': 1000})
    assert load(pretrained['rope'])['iter_num'] == before


def test_resume_continues_exactly(tmp_path, pretrained):
    """4 steps in one go == 2 steps, stop, resume (same command + --init_from=resume) to 4."""
    settings = {'init_dir': pretrained['rope'], 'rope_scaling': 'pi', 'max_iters': 4, 'lr_decay_iters': 4,
                'warmup_iters': 1, 'eval_interval': 2, 'eval_iters': 2}
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    finetune_long.finetune({**settings, 'out_dir': whole})
    finetune_long.finetune({**settings, 'out_dir': parts, 'max_iters': 2})
    torch.manual_seed(123)  # the resume must not depend on the state it finds
    with pytest.raises(ConfigError, match='factor'):
        finetune_long.finetune({**settings, 'out_dir': parts, 'init_from': 'resume', 'factor': 8})
    finetune_long.finetune({**settings, 'out_dir': parts, 'init_from': 'resume'})
    a, b = load(whole), load(parts)
    assert a['iter_num'] == b['iter_num'] == 4
    assert b['model_args'] == a['model_args'] and b['model_args']['rope_scaling'] == 'pi'
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k

    def losses(d):
        with open(os.path.join(d, 'log.jsonl')) as f:
            return [(r['iter'], r.get('loss'), r.get('val_loss')) for r in map(json.loads, f)]
    assert losses(parts) == losses(whole)


def test_command_line_with_config_file(tmp_path, pretrained, capsys, monkeypatch):
    """`python finetune_long.py configs/finetune/tiny.py --k=v` (run as __main__ in this process)."""
    out = str(tmp_path / 'ft')
    argv = ['finetune_long.py', os.path.join(REPO, 'configs', 'finetune', 'tiny.py'), f'--init_dir={pretrained["rope"]}',
            f'--out_dir={out}', '--rope_scaling=yarn', '--max_iters=2', '--eval_interval=2', '--eval_iters=1',
            '--warmup_iters=1', '--factor=2']
    monkeypatch.setattr(sys, 'argv', argv)
    runpy.run_path(os.path.join(REPO, 'finetune_long.py'), run_name='__main__')
    ckpt = load(out)
    assert ckpt['config']['eval_interval'] == 2 and ckpt['config']['weight_decay'] == 0.0  # file, then --k=v
    assert (ckpt['model_args']['block_size'], ckpt['model_args']['rope_factor']) == (32, 2.0)
    monkeypatch.setattr(sys, 'argv', ['finetune_long.py', f'--init_dir={pretrained["learned"]}', f'--out_dir={out}2'])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, 'finetune_long.py'), run_name='__main__')
    assert 'interpolate_learned=True' in str(e.value.code) and str(e.value.code).startswith('error:')


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_prints_usage_and_settings(capsys, monkeypatch, flag):
    monkeypatch.setattr(sys, 'argv', ['finetune_long.py', flag])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, 'finetune_long.py'), run_name='__main__')
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'Long-context fine-tuning: take a pretrained checkpoint' in out
    assert '  --factor=4.0\n' in out and '  --learning_rate=0.001\n' in out  # its own settings and train.py's


# ---------------------------------------------------------------------------
# the whole experiment, with tiny settings


def test_paper_in_miniature_quick_with_two_seeds(tmp_path):
    data = make_data(tmp_path / 'data' / 'pg19' / 'byte', n_docs=(6, 3, 3), doc_len=1500)
    out = tmp_path / 'miniature'
    cwd = os.getcwd()
    summary = paper_in_miniature.main(['--quick', '--seeds=2', f'--out={out}', f'--data_dir={data}'])
    assert os.getcwd() == cwd
    Ls, seeds = [128, 256, 512], [1337, 1338]
    assert summary['lengths'] == Ls and summary['seeds'] == seeds
    rows = summary['perplexity']
    labels = [r['label'] for r in rows]
    assert labels == ['TAPA small-model linear', 'RoPE', 'ALiBi', 'NoPE', 'RoPE + YaRN x4 (inference only)',
                      'RoPE + dynamic NTK (inference only)', 'TAPA small-model linear (ft 512)', 'RoPE + PI x4 (ft 512)',
                      'RoPE + YaRN x4 (ft 512)', 'RoPE + ABF base 500000 (ft 512)']
    assert [r['trained'] for r in rows] == [128] * 6 + [512] * 4
    # every training ran once per seed, into its own folder, with that seed
    for name in ('tapa_small_linear', 'rope', 'alibi', 'nope', 'tapa_small_linear-ft4x', 'rope-ft4x-pi',
                 'rope-ft4x-yarn', 'rope-ft4x-abf'):
        for sd in seeds:
            assert load(out / 'ckpt' / f'{name}-s{sd}')['config']['seed'] == sd
    ft = lambda n: load(out / 'ckpt' / n)['model_args']  # noqa: E731
    assert (ft('rope-ft4x-pi-s1338')['rope_scaling'], ft('rope-ft4x-pi-s1338')['rope_factor']) == ('pi', 4.0)
    assert ft('rope-ft4x-yarn-s1337')['rope_scaling'] == 'yarn' and ft('rope-ft4x-abf-s1337')['rope_base'] == 5e5
    assert ft('tapa_small_linear-ft4x-s1338')['block_size'] == 512
    assert ft('tapa_small_linear-ft4x-s1338')['tapa_phase'] == 'linear'
    init = load(out / 'ckpt' / 'tapa_small_linear-ft4x-s1338')['config']['init_ckpt']  # its own seed's model
    assert init.endswith(os.path.join('tapa_small_linear-s1338', 'ckpt.pt'))
    commands = (out / 'commands.sh').read_text()
    assert commands.count('python train.py configs/tiny_') == 8 and commands.count('python finetune_long.py') == 8
    # one evaluation per model and seed: 4 zero-shot + 2 RoPE extensions + 4 fine-tuned, twice
    assert commands.count('--split=test') == 20 and '--protocol' not in commands and '--stride' not in commands

    # the reported numbers, recomputed here from each seed's own evaluation (eval_ppl.py's JSON)
    results = json.loads((out / 'results.json').read_text())
    assert results['evaluation']['split'] == 'test' and results['evaluation']['protocol'] == 'spans'
    evals = {}
    for sd in seeds:
        for name in ('zeroshot_tapa_small_linear', 'zeroshot_rope', 'zeroshot_alibi', 'zeroshot_nope',
                     'zeroshot_rope_yarn4', 'zeroshot_rope_dynntk', 'finetuned_tapa_small_linear-ft4x',
                     'finetuned_rope-ft4x-pi', 'finetuned_rope-ft4x-yarn', 'finetuned_rope-ft4x-abf'):
            for m in json.loads((out / 'eval' / f'{name}-s{sd}.json').read_text())['models']:
                evals[(m['label'], sd)] = m['results']
    for r in results['perplexity']:
        assert r['seeds'] == seeds
        for L in map(str, Ls):
            st = r['results'][L]
            per_seed = [evals[(r['label'], sd)][L]['ppl'] for sd in seeds]
            assert st['per_seed'] == pytest.approx(per_seed, rel=1e-12)
            assert st['mean'] == pytest.approx(sum(per_seed) / 2, rel=1e-12) == r['ppl'][L]
            assert st['spread'] == pytest.approx([min(per_seed), max(per_seed)], rel=1e-12)
            ratios = [evals[(r['label'], sd)][L]['ppl'] / evals[(r['label'], sd)]['128']['ppl'] for sd in seeds]
            assert st['ratio'] == pytest.approx(sum(ratios) / 2, rel=1e-12)
            assert st['ci'][0] <= st['mean'] <= st['ci'][1] and 1 < st['mean'] < 1000, (r['label'], L)
    md = (out / 'results.md').read_text()
    for needle in ('## Zero-shot (trained at 128)', '## Fine-tuned to 4x (512)', 'RoPE + PI x4 (ft 512)',
                   '| model | trained at | 128 | 256 | 512 |', 'Passkey', 'Wall time', 'logical CPUs',
                   'the mean over 2 seeds (1337, 1338)', 'Test perplexity', 'understate the variance between books'):
        assert needle in md, needle
    with open(out / 'results.csv') as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) * len(Ls)
    first = csv_rows[0]
    assert float(first['ppl_mean']) == pytest.approx((float(first['ppl_s1337']) + float(first['ppl_s1338'])) / 2)
    assert float(first['ppl_lo']) <= float(first['ppl_mean']) <= float(first['ppl_hi'])
    assert results['hardware']['logical_cpus'] == os.cpu_count()
    assert (out / 'eval' / 'passkey-s1338.json').exists() and (out / 'eval' / 'finetuned_rope-ft4x-pi-s1337.md').exists()
    if HAS_MATPLOTLIB:
        assert (out / 'ppl.png').stat().st_size > 10000
    # run again, zero-shot only: the finished pretrainings (same settings) are reused, not retrained,
    # and so are the finished evaluations (same command, same checkpoints and text)
    digest = lambda p: hashlib.sha256(open(p, 'rb').read()).hexdigest()  # noqa: E731
    before = {sd: digest(out / 'ckpt' / f'rope-s{sd}' / 'ckpt.pt') for sd in seeds}
    evals = sorted((out / 'eval').glob('zeroshot*.json'))
    evals = [p for p in evals if not p.name.endswith('.inputs.json')]
    assert len(evals) == 12 and all(p.with_suffix('.inputs.json').exists() for p in evals)
    written = {p.name: p.stat().st_mtime_ns for p in evals}
    finetuned = sorted((out / 'ckpt').glob('*-ft4x*-s*/ckpt.pt'))
    assert len(finetuned) == 8 and all((p.parent / 'finetune.inputs.json').exists() for p in finetuned)
    finetuned_evals = [p for p in sorted((out / 'eval').glob('finetuned_*.json')) if not p.name.endswith('.inputs.json')]
    assert len(finetuned_evals) == 8
    passkeys = [out / 'eval' / f'passkey-s{sd}.json' for sd in seeds]
    tuned = {str(p): p.stat().st_mtime_ns for p in finetuned + finetuned_evals + passkeys}
    again = paper_in_miniature.main(['--quick', '--seeds=2', f'--out={out}', f'--data_dir={data}', '--finetune=False'])
    assert {sd: digest(out / 'ckpt' / f'rope-s{sd}' / 'ckpt.pt') for sd in seeds} == before
    assert {p.name: p.stat().st_mtime_ns for p in evals} == written
    assert again['perplexity'][0]['results'][Ls[0]]['mean'] == rows[0]['results'][Ls[0]]['mean']
    assert again['command'].endswith('--finetune=False')  # its own command, not one of its steps'
    # commands.sh still lists every command of the result, the reused ones marked
    reused = (out / 'commands.sh').read_text()
    assert reused.count('python train.py configs/tiny_') == 8 and reused.count('# finished before: reused') == 20
    # the steps it reused keep the wall time of the invocation that ran them
    first_times = summary['step_seconds']
    assert {f'pretrain_{pe}-s{sd}' for pe in ('tapa_small_linear', 'rope') for sd in seeds} <= set(first_times)
    assert again['step_seconds'] == first_times
    assert json.loads((out / 'step_seconds.json').read_text()) == first_times
    # a checkpoint that changed (here one weight of seed 1338's RoPE) makes its evaluations run again, and
    # only those: seed 1338's RoPE, zero-shot and with its two inference-time extensions
    path = out / 'ckpt' / 'rope-s1338' / 'ckpt.pt'
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    name = next(k for k, v in ckpt['model'].items() if v.is_floating_point())
    ckpt['model'][name].view(-1)[0] += 1.0
    torch.save(ckpt, path)
    paper_in_miniature.main(['--quick', '--seeds=2', f'--out={out}', f'--data_dir={data}', '--finetune=False'])
    rerun = {p.name for p in evals if p.stat().st_mtime_ns != written[p.name]}
    assert rerun == {'zeroshot_rope-s1338.json', 'zeroshot_rope_yarn4-s1338.json', 'zeroshot_rope_dynntk-s1338.json'}
    # and with the fine-tunes: only the three that start from that RoPE (their evaluations and seed 1338's
    # passkey retrieval) run again
    paper_in_miniature.main(['--quick', '--seeds=2', f'--out={out}', f'--data_dir={data}'])
    rerun = {os.path.relpath(p, out) for p, t in tuned.items() if os.stat(p).st_mtime_ns != t}
    assert rerun == {*(f'ckpt/rope-ft4x-{m}-s1338/ckpt.pt' for m in ('pi', 'yarn', 'abf')),
                     *(f'eval/finetuned_rope-ft4x-{m}-s1338.json' for m in ('pi', 'yarn', 'abf')),
                     'eval/passkey-s1338.json'}
    argv = ['python', 'train.py', 'configs/tiny_rope.py', f'--out_dir={out / "ckpt" / "rope-s1337"}', '--seed=1337',
            f'--data_dir={data}', '--eval_iters=1', '--log_interval=1', '--warmup_iters=1', '--batch_size=4']
    n = paper_in_miniature.QUICK['pretrain_iters']
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert paper_in_miniature.finished_training(argv + [f'--max_iters={n}', f'--lr_decay_iters={n}'])
        assert not paper_in_miniature.finished_training(argv + [f'--max_iters={n}', f'--lr_decay_iters={n + 1}'])
        assert not paper_in_miniature.finished_training(argv + [f'--max_iters={n + 1}', f'--lr_decay_iters={n + 1}'])
    finally:
        os.chdir(cwd)


def test_val_losses_read_a_resumed_log_and_last_val_loss_is_the_latest_step(tmp_path):
    # a run that evaluated at 0, 4 and 8, was interrupted and resumed from 4: its log says 4 and 8 again
    recs = [dict(kind='eval', iter=0, val_loss=5.0), dict(kind='train', iter=2, loss=4.5),
            dict(kind='eval', iter=4, val_loss=4.0), dict(kind='eval', iter=8, val_loss=3.5),
            dict(kind='eval', iter=4, val_loss=4.0), dict(kind='train', iter=6, loss=3.2),
            dict(kind='eval', iter=8, val_loss=3.25)]
    (tmp_path / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    assert paper_in_miniature.val_losses(tmp_path) == {0: 5.0, 4: 4.0, 8: 3.25}
    assert paper_in_miniature.last_val_loss(tmp_path) == (8, 3.25)
    (tmp_path / 'log.jsonl').write_text(json.dumps(dict(kind='train', iter=1, loss=6.0)) + '\n')
    assert paper_in_miniature.last_val_loss(tmp_path) is None  # no evaluation yet
    with pytest.raises(OSError):
        paper_in_miniature.val_losses(tmp_path / 'missing')


def test_write_results_writes_the_three_files(tmp_path):
    paper_in_miniature.write_results(tmp_path, ['# title', '', 'text'], dict(a=1, b=[2.5]), ['x', 'y'],
                                     [[1, 'p'], [2, '']])
    assert (tmp_path / 'results.md').read_text() == '# title\n\ntext'
    assert json.loads((tmp_path / 'results.json').read_text()) == dict(a=1, b=[2.5])
    with open(tmp_path / 'results.csv', newline='') as f:
        assert list(csv.reader(f)) == [['x', 'y'], ['1', 'p'], ['2', '']]


def docs_sums(rng, n_docs, rate_spread=1.0):
    """Made-up sums per document: (nll, tokens) with documents of different lengths and difficulty."""
    tokens = rng.integers(50, 150, n_docs)
    return np.asarray(tokens * (2.0 + rate_spread * rng.random(n_docs)), dtype=np.float64), tokens


def test_aggregate_means_spreads_and_intervals_by_hand():
    rng = np.random.default_rng(3)
    Ls = [8, 16, 32]
    nll, tok = docs_sums(rng, 8)
    # three seeds of very different level and growth with L: a mean of ratios differs from a ratio of means
    level, growth = [0.0, 0.5, 1.0], [0.05, 0.3, 0.0]
    runs = [{L: (nll + tok * (level[s] + growth[s] * math.log2(L / 8)), tok) for L in Ls} for s in range(3)]
    stats = paper_in_miniature.aggregate({'a': runs}, Ls, n_resamples=500)['a']

    def by_hand(s, L):  # exp(total nll / total tokens), with Python's own sums
        n, t = runs[s][L]
        return math.exp(sum(n.tolist()) / sum(t.tolist()))
    for L in Ls:
        per_seed = [by_hand(s, L) for s in range(3)]
        st = stats[L]
        assert st['per_seed'] == pytest.approx(per_seed, rel=1e-12)
        assert st['mean'] == pytest.approx(sum(per_seed) / 3, rel=1e-12)
        assert st['spread'] == pytest.approx([min(per_seed), max(per_seed)], rel=1e-12)
        ratios = [by_hand(s, L) / by_hand(s, 8) for s in range(3)]
        assert st['ratio'] == pytest.approx(sum(ratios) / 3, rel=1e-12)
        assert st['ratio_spread'] == pytest.approx([min(ratios), max(ratios)], rel=1e-12)
        assert st['ci'][0] <= st['mean'] <= st['ci'][1] and st['ci'][0] < st['ci'][1]
        assert st['ratio_ci'][0] <= st['ratio'] <= st['ratio_ci'][1]
    ratio_of_means = sum(by_hand(s, 32) for s in range(3)) / sum(by_hand(s, 8) for s in range(3))
    assert stats[32]['ratio'] != pytest.approx(ratio_of_means, rel=1e-3)  # the data tell the two apart
    assert stats[8]['ratio'] == 1.0 and stats[8]['ratio_ci'] == [1.0, 1.0]


def test_aggregate_resamples_documents_once_for_every_seed_length_and_model():
    rng = np.random.default_rng(4)
    nll, tok = docs_sums(rng, 6)
    k = 0.25  # at 16 every document's loss is k nats per token higher: the ratio is exp(k) on ANY documents
    run = {8: (nll, tok), 16: (nll + k * tok, tok)}
    agg = paper_in_miniature.aggregate({'a': [run], 'b': [run], 'two': [run, run]}, [8, 16], n_resamples=400)
    # paired across lengths: every resample's ratio is exactly exp(k) (independent draws would spread it)
    assert agg['a'][16]['ratio_ci'] == pytest.approx([math.exp(k), math.exp(k)], rel=1e-9)
    assert agg['a'][16]['ci'][1] > 1.05 * agg['a'][16]['ci'][0]  # while the perplexity itself varies
    # paired across models: the same data gives the same interval
    assert agg['a'] == agg['b']
    # paired across seeds: two seeds with the same sums give one seed's interval (independent draws per
    # seed would average the noise away and narrow it)
    assert agg['two'][16]['ci'] == pytest.approx(agg['a'][16]['ci'], rel=1e-12)


def test_aggregate_differences_between_models_are_paired_over_the_books():
    rng = np.random.default_rng(7)
    nll, tok = docs_sums(rng, 8, rate_spread=2.0)  # books of very different difficulty
    a = [{8: (nll, tok)}, {8: (nll + 0.1 * tok, tok)}]  # two seeds
    same = [dict(run) for run in a]
    # b is 0.2 nats per token harder than a on every book, c on half the books only
    b = [{8: (n + 0.2 * t, t)} for n, t in (run[8] for run in a)]
    half = np.where(np.arange(8) % 2 == 0, 0.4, 0.0)
    c = [{8: (n + half * t, t)} for n, t in (run[8] for run in a)]
    agg = paper_in_miniature.aggregate({'a': a, 'same': same, 'b': b, 'c': c}, [8], n_resamples=500,
                                       against={'same': 'a', 'b': 'a', 'c': 'a', 'a': 'a'})

    def ppl(run):  # by hand: exp(total nll / total tokens)
        n, t = run[8]
        return math.exp(sum(n.tolist()) / sum(t.tolist()))
    mean = lambda runs: sum(ppl(r) for r in runs) / len(runs)  # noqa: E731
    assert agg['b'][8]['diff'] == pytest.approx(mean(b) - mean(a), rel=1e-12)
    assert agg['b'][8]['diff_to'] == 'a' and 'diff' not in agg['a'][8]  # (no difference to itself)
    # the same model on the same books: no difference in any resample (independent draws would give one)
    assert agg['same'][8]['diff_ci'] == [0.0, 0.0]
    # harder on every book: every resample says so, though the perplexities' own intervals overlap
    lo, hi = agg['b'][8]['diff_ci']
    assert 0 < lo <= agg['b'][8]['diff'] <= hi
    assert agg['b'][8]['ci'][0] < agg['a'][8]['ci'][1]
    # as much harder on average but on half the books only: a wider interval, as the books disagree
    assert agg['c'][8]['diff_ci'][1] - agg['c'][8]['diff_ci'][0] > hi - lo


def test_aggregate_with_one_seed_gives_eval_ppls_intervals():
    rng = np.random.default_rng(5)
    Ls = [8, 16]
    nll, tok = docs_sums(rng, 7)
    run = {8: (nll, tok), 16: (nll * 1.1, tok)}
    results = dict(lengths=Ls, models=[dict(label='a', results={str(L): dict(ppl=paper_in_miniature.run_ppl(*run[L]))
                                                               for L in Ls})])
    eval_ppl.add_intervals(results, {(0, L): run[L] for L in Ls}, 300)
    ours = paper_in_miniature.aggregate({'a': [run]}, Ls, n_resamples=300)['a']
    for L in Ls:
        theirs = results['models'][0]['results'][str(L)]
        assert ours[L]['ci'] == pytest.approx(theirs['ci'], rel=1e-12)
        assert ours[L]['ratio_ci'] == pytest.approx(theirs['ratio_ci'], rel=1e-12)
        assert ours[L]['mean'] == pytest.approx(theirs['ppl'], rel=1e-12)


def test_aggregate_intervals_shrink_with_more_documents_and_vanish_without_variation():
    rng = np.random.default_rng(6)
    nll, tok = docs_sums(rng, 8)
    more = (np.tile(nll, 4), np.tile(tok, 4))  # the same kind of books, 4 times as many
    width = lambda st: st['ci'][1] - st['ci'][0]  # noqa: E731
    few = paper_in_miniature.aggregate({'a': [{8: (nll, tok)}]}, [8], 1000)['a'][8]
    many = paper_in_miniature.aggregate({'a': [{8: more}]}, [8], 1000)['a'][8]
    assert width(many) < 0.7 * width(few)  # about half: 1 / sqrt(4)
    same = paper_in_miniature.aggregate({'a': [{8: (2.0 * tok.astype(float), tok)}]}, [8], 1000)['a'][8]
    assert same['ci'] == pytest.approx([math.exp(2.0)] * 2, rel=1e-12)  # every book equally hard: no spread
    # a cell without a value (learned embeddings past their context) stays empty, the others do not
    agg = paper_in_miniature.aggregate({'learned': [{8: (nll, tok), 16: None}]}, [8, 16], 100)['learned']
    assert agg[16] is None and agg[8]['ratio'] == 1.0
    with pytest.raises(ValueError, match='different numbers of documents'):
        paper_in_miniature.aggregate({'a': [{8: (nll, tok)}], 'b': [{8: more}]}, [8], 10)


def test_tapa_probe_table_takes_runs_with_different_lengths(tmp_path, capsys):
    """experiments/tapa_probe.py --table: the columns are every length any run was evaluated at; a run
    without one shows n/a, and its ratio uses its own longest and shortest lengths."""
    import tapa_probe
    path = tmp_path / 'results.jsonl'
    rows = [('a', {'128': 2.0, '256': 2.1, '512': 2.3}), ('b', {'128': 1.9, '256': 2.0})]
    path.write_text(''.join(json.dumps({'settings': dict(tapa_probe.DEFAULTS, name=n), 'val_loss': v}) + '\n'
                            for n, v in rows))
    tapa_probe.print_table(str(path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].count('val loss @') == 3 and '@512' in lines[0]
    assert lines[2].startswith('| a |') and lines[2].endswith(f'| {math.exp(0.3):.2f} |')
    assert lines[3].startswith('| b |') and '| n/a |' in lines[3] and lines[3].endswith(f'| {math.exp(0.1):.2f} |')


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_tapa_probe_help(capsys, flag):
    """experiments/tapa_probe.py -h: its usage and settings (as every script here), not 'unknown setting'."""
    import tapa_probe
    with pytest.raises(SystemExit) as e:
        tapa_probe.parse([flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'what makes TAPA learn in a small model' in out and "  --phase_scale=1.0\n" in out and '--table' in out


@pytest.mark.parametrize('arg, message', [
    ('--phase_scale=abc', r"--phase_scale=abc: expected a float \(the default is 1\.0\)"),
    ('--pe=foo', r"--pe=foo: expected one of tapa, rope, alibi, nope, learned"),
    ('--qk_norm=all', r"--qk_norm=all: expected one of none, amp, phase, both"),
    ('--eval_lengths=abc', r"--eval_lengths=abc: expected comma-separated positive integers"),
    ('--eval_lengths=0', r"--eval_lengths=0: expected comma-separated positive integers"),
    ('--bias=maybe', r"--bias=maybe: expected True or False"),
])
def test_tapa_probe_bad_settings_are_one_line_errors(monkeypatch, arg, message):
    """experiments/tapa_probe.py: a mistyped setting is a one-line message, not a traceback (or, for
    --eval_lengths, a failure after the whole training)."""
    import tapa_probe
    monkeypatch.setattr(tapa_probe, 'settings', dict(tapa_probe.DEFAULTS))  # parse() fills it in
    with pytest.raises(SystemExit, match=message):
        tapa_probe.parse([arg])


@pytest.mark.parametrize('lengths, message', [
    ('abc', r"--lengths=abc: expected comma-separated integers"),
    ('1,128', r"--lengths=1,128: expected one or more lengths, each at least 2"),  # eval_ppl.py's bound
    ('', r"--lengths=: expected one or more lengths, each at least 2"),
])
def test_paper_in_miniature_bad_lengths(tmp_path, lengths, message):
    with pytest.raises(ConfigError, match=message):
        paper_in_miniature.main([f'--lengths={lengths}', f'--out={tmp_path / "m"}'])
    assert not (tmp_path / 'm').exists()  # refused before anything is written


@pytest.mark.parametrize('content', [None, '', '\n'])
def test_tapa_probe_table_without_runs_is_one_line(tmp_path, content):
    """experiments/tapa_probe.py --table before any run (no results file, or an empty one): a one-line
    message that says what to run, not a traceback."""
    import tapa_probe
    path = tmp_path / 'runs' / 'results.jsonl'
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with pytest.raises(SystemExit, match=r"^no runs in .*results\.jsonl yet: train one first, "
                                         r"e\.g\. python experiments/tapa_probe\.py --name=rope") as e:
        tapa_probe.print_table(str(path))
    assert '\n' not in str(e.value.code)


def test_paper_in_miniature_quick_never_uses_the_full_runs_folder(tmp_path, monkeypatch):
    """--quick writes to runs/miniature-quick by default, so a smoke test never overwrites a full run's
    results and checkpoints in runs/miniature; and --quick --out=runs/miniature is refused."""
    data = make_data(tmp_path / 'data', n_docs=(6, 3, 3), doc_len=1500)
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)  # the default folders are relative to where it is run from

    class Stop(Exception):
        pass
    used = []

    def first_step(steps, cfg, record, done=None, save=None):  # stop at the first command: only the folder matters here
        used.append(cfg['out'])
        raise Stop
    monkeypatch.setattr(paper_in_miniature, 'run_steps', first_step)
    with pytest.raises(Stop):
        paper_in_miniature.main(['--quick', f'--data_dir={data}'])
    assert used == [str(work / 'runs' / 'miniature-quick')]
    assert not (work / 'runs' / 'miniature').exists()
    for out in ('runs/miniature', str(work / 'runs' / 'miniature'), 'runs/../runs/miniature'):
        with pytest.raises(ConfigError, match=r"--quick --out=.*: that is where the full run keeps its results"):
            paper_in_miniature.main(['--quick', f'--out={out}', f'--data_dir={data}'])
    assert not (work / 'runs' / 'miniature').exists()
    with pytest.raises(Stop):  # and the full run still defaults to runs/miniature
        paper_in_miniature.main([f'--data_dir={data}'])
    assert used[-1] == str(work / 'runs' / 'miniature')


def test_paper_in_miniature_zero_shot_only_and_its_settings(tmp_path, monkeypatch):
    """--finetune=False runs no fine-tuning, no evaluation of it and no passkey, and needs neither TAPA nor
    RoPE; bad settings are one-line errors before anything runs."""
    data = make_data(tmp_path / 'data', n_docs=(6, 3, 3), doc_len=1500)

    class Stop(Exception):
        pass
    names = []

    def record(steps, cfg, times, done=None, save=None):  # the commands, not run
        names.extend(name for name, _ in steps)

    def stop(path):
        raise Stop
    monkeypatch.setattr(paper_in_miniature, 'run_steps', record)
    monkeypatch.setattr(paper_in_miniature, 'read_eval', stop)
    with pytest.raises(Stop):
        paper_in_miniature.main(['--quick', f'--out={tmp_path / "m"}', f'--data_dir={data}', '--encodings=alibi,t5',
                                 '--finetune=False', '--seeds=2'])
    assert names == ['pretrain_alibi-s1337', 'pretrain_t5-s1337', 'pretrain_alibi-s1338', 'pretrain_t5-s1338',
                     'eval_zeroshot_alibi-s1337', 'eval_zeroshot_t5-s1337', 'eval_zeroshot_alibi-s1338',
                     'eval_zeroshot_t5-s1338']
    base = ['--quick', f'--out={tmp_path / "m"}', f'--data_dir={data}']
    for args, message in ((['--encodings=alibi,rope'], 'must include a TAPA config'),
                          (['--encodings=rope,tapa_small,rope'], 'names rope twice'),
                          (['--encodings=tapa,rope,fancy'], 'no configs/tiny_fancy.py'),
                          (['--seeds=0'], '--seeds=0 must be at least 1'),
                          (['--pretrain_iters=0'], '--pretrain_iters=0 must be at least 1'),
                          (['--passkey_trials=0'], '--passkey_trials=0 must be at least 1'),  # else: after it all
                          (['--abf_base=-5'], '--abf_base=-5 must be a RoPE base'),
                          (['--split=train'], '--split=train: use test'),
                          (['--max_tokens_per_length=8'], 'at least one span of 32 tokens')):
        with pytest.raises(ConfigError, match=message):
            paper_in_miniature.main(base + args)
    old = make_data(tmp_path / 'old', n_docs=(6, 3), doc_len=1500)  # prepared without the test books
    with pytest.raises(ConfigError, match=r'has no test split \(it has train, validation\): prepare it again'):
        paper_in_miniature.main(['--quick', f'--out={tmp_path / "m"}', f'--data_dir={old}'])


def test_finished_evaluation_needs_its_inputs(tmp_path):
    """An evaluation counts as finished only with its JSON and a record of what it read that still matches;
    a record written while a file was missing (null) never does, even when that file is still missing."""
    out, ckpt = tmp_path / 'eval' / 'zeroshot_rope-s1337', tmp_path / 'rope'
    out.parent.mkdir()
    argv = ['python', 'eval_ppl.py', f'--ckpt={ckpt}', f'--out={out}']
    (out.parent / (out.name + '.json')).write_text('{}')
    (out.parent / (out.name + '.inputs.json')).write_text('null')
    assert not paper_in_miniature.finished_evaluation(argv, str(tmp_path), 'test')
    ckpt.mkdir()
    (ckpt / 'ckpt.pt').write_bytes(b'weights')
    for ext in ('.bin', '.docs.npy'):
        (tmp_path / f'test{ext}').write_bytes(b'text')
    record = paper_in_miniature.evaluation_inputs(argv, str(tmp_path), 'test')
    (out.parent / (out.name + '.inputs.json')).write_text(json.dumps(record))
    assert paper_in_miniature.finished_evaluation(argv, str(tmp_path), 'test')
    (tmp_path / 'test.bin').write_bytes(b'other text')  # the text changed: run it again
    assert not paper_in_miniature.finished_evaluation(argv, str(tmp_path), 'test')
