"""Checks of train.py, configurator.py, sample.py and configs/: a short real training run whose
loss falls, an interrupted-and-resumed run that matches an uninterrupted one bit for bit, and one
clear error for each kind of bad input. Tiny models and tiny token files made here, CPU only."""
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import types
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import runtime  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError, get_overrides  # noqa: E402
from model import GPTConfig  # noqa: E402

torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

# a model small enough to train a few dozen steps in seconds
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=4,
            warmup_iters=3, lr_decay_iters=30, learning_rate=5e-3, min_lr=1e-3, device='cpu')


def make_data(folder, n_train=20000, n_val=4000, tokenizer='byte'):
    """Write a dataset in the prepared-data format (contract) directly with numpy: real text as
    bytes (this repository's model.py), so there is something to learn; one document per split."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(REPO, 'model.py'), 'rb') as f:
        text = f.read().replace(b'\x00', b'')
    assert len(text) >= n_train + n_val
    splits = {}
    for split, (a, b) in (('train', (0, n_train - 1)), ('validation', (n_train, n_train + n_val - 1))):
        tokens = np.append(np.frombuffer(text[a:b], dtype=np.uint8), 0).astype(np.uint16)  # + EOT (0)
        tokens.tofile(os.path.join(folder, f'{split}.bin'))
        np.save(os.path.join(folder, f'{split}.docs.npy'), np.array([0, len(tokens)], dtype=np.int64))
        splits[split] = {'tokens': len(tokens), 'docs': 1}
    meta = {'dataset': 'tiny', 'tokenizer': tokenizer, 'vocab_size': 256, 'eot_token': 0,
            'dtype': 'uint16', 'splits': splits, 'source': 'test'}
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(folder)


def read_log(out_dir, drop=('elapsed_s', 'tokens_per_s')):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('data') / 'tiny' / 'byte')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
    """A short real training run (30 steps): its out_dir and its result."""
    out_dir = str(tmp_path_factory.mktemp('trained'))
    result = train.train({**TINY, 'data_dir': data_dir, 'out_dir': out_dir, 'max_iters': 30,
                          'eval_interval': 10, 'log_interval': 5})
    return out_dir, result


# ---------------------------------------------------------------------------
# a real run


def test_training_loss_falls(trained):
    out_dir, result = trained
    log = read_log(out_dir)
    evals = [r for r in log if r['kind'] == 'eval']
    assert [r['iter'] for r in evals] == [0, 10, 20, 30]
    assert [r['iter'] for r in log if r['kind'] == 'train'] == [0, 5, 10, 15, 20, 25]
    # an untrained model guesses uniformly among 256 bytes: loss ln(256) = 5.55
    assert abs(evals[0]['val_loss'] - math.log(256)) < 0.3
    # 30 steps on real text: well below a uniform guess, and falling
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.5
    assert evals[-1]['val_loss'] < evals[1]['val_loss']
    assert result['iter_num'] == 30 and result['val_loss'] == evals[-1]['val_loss']
    # the learning rate of the log follows warmup + cosine (independent formula)
    lrs = {r['iter']: r['lr'] for r in log if r['kind'] == 'train'}
    assert lrs[0] == pytest.approx(5e-3 * 1 / 4)
    assert lrs[15] == pytest.approx(1e-3 + 0.5 * (1 + math.cos(math.pi * 12 / 27)) * (5e-3 - 1e-3))


def test_checkpoint_holds_the_contract(trained):
    out_dir, _ = trained
    # loadable without unpickling arbitrary objects
    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)
    for key in ('model', 'optimizer', 'scaler', 'model_args', 'config', 'iter_num', 'best_val_loss', 'rng'):
        assert key in ckpt
    assert ckpt['format_version'] == 1 and ckpt['iter_num'] == 30
    assert set(ckpt['model_args']) == {f.name for f in fields(GPTConfig)}
    assert ckpt['model_args']['vocab_size'] == 256 and ckpt['model_args']['n_layer'] == 2
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    assert set(ckpt['rng']) >= {'python', 'numpy', 'torch', 'cuda', 'batches'}
    assert ckpt['config']['batch_size'] == 8 and ckpt['config']['pos_encoding'] == 'tapa'
    evals = [r['val_loss'] for r in read_log(out_dir) if r['kind'] == 'eval']
    assert ckpt['best_val_loss'] == min(evals)
    assert not os.path.exists(os.path.join(out_dir, 'ckpt.pt.tmp'))


def test_loading_ignores_torch_compile_prefix(trained):
    out_dir, _ = trained
    ckpt = runtime.load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    plain = runtime.model_from_checkpoint(ckpt)
    ckpt['model'] = {'_orig_mod.' + k: v for k, v in ckpt['model'].items()}  # as a compiled model saves
    compiled = runtime.model_from_checkpoint(ckpt)
    for (k, a), (_, b) in zip(plain.state_dict().items(), compiled.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_continues_exactly(tmp_path, data_dir):
    """8 steps in one go == 4 steps, stop, resume for 4 more: same losses, same weights. With dropout
    and gradient accumulation, so the batch sampler's and dropout's random states both matter, and
    with TAPA's phase ramp running across the interruption."""
    settings = {**TINY, 'data_dir': data_dir, 'dropout': 0.1, 'gradient_accumulation_steps': 2,
                'batch_size': 4, 'eval_interval': 4, 'eval_iters': 2, 'log_interval': 1,
                'warmup_iters': 2, 'lr_decay_iters': 8, 'tapa_phase_warmup_iters': 6}  # a ramp across the stop
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    train.train({**settings, 'out_dir': whole, 'max_iters': 8})
    train.train({**settings, 'out_dir': parts, 'max_iters': 4})
    assert runtime.load_checkpoint(os.path.join(parts, 'ckpt.pt'))['iter_num'] == 4
    # a line an interrupted run wrote after the checkpoint must not survive the resume
    with open(os.path.join(parts, 'log.jsonl'), 'a') as f:
        f.write(json.dumps({'kind': 'train', 'iter': 4, 'loss': 123.0, 'lr': 0.0}) + '\n{"kind": "tr')
    torch.manual_seed(999)  # the resume must not depend on the state it finds
    train.train({'out_dir': parts, 'init_from': 'resume', 'max_iters': 8})

    log_whole, log_parts = read_log(whole), read_log(parts)
    assert [r['iter'] for r in log_whole if r['kind'] == 'train'] == list(range(8))
    assert log_parts == log_whole  # every loss and val loss identical, bit for bit
    a = torch.load(os.path.join(whole, 'ckpt.pt'), weights_only=True)
    b = torch.load(os.path.join(parts, 'ckpt.pt'), weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 8
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert torch.equal(a['rng']['batches'], b['rng']['batches'])


def test_eval_batches_are_fixed_and_draw_no_training_randomness(data_dir):
    cfg, _ = train.resolve_config({**TINY, 'data_dir': data_dir})
    _, _, paths, _ = train.find_data(cfg)
    model = train.GPT(GPTConfig(**{**{k: cfg[k] for k in train.MODEL_KEYS}, 'dropout': 0.5}, vocab_size=256))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = train.estimate_loss(model, paths, cfg, torch.device('cpu'), nullcontext())
    second = train.estimate_loss(model, paths, cfg, torch.device('cpu'), nullcontext())
    assert first == second
    assert torch.equal(torch.get_rng_state(), state)  # no dropout draws during evaluation
    assert model.training


def test_get_batch_windows(data_dir):
    data = np.fromfile(os.path.join(data_dir, 'train.bin'), dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = train.get_batch(os.path.join(data_dir, 'train.bin'), 6, 16, g, torch.device('cpu'))
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.long
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        # each row is a window of 17 consecutive tokens of the data; y is x shifted by one
        starts = [i for i in range(len(data) - 16) if np.array_equal(data[i:i + 16], row_x)]
        assert any(np.array_equal(data[i + 1:i + 17], row_y) for i in starts)


def test_sample_from_checkpoint(trained):
    out_dir, _ = trained
    cmd = [sys.executable, os.path.join(REPO, 'sample.py'), f'--out_dir={out_dir}', '--num_samples=2',
           '--max_new_tokens=30', '--start=def f(x):', '--seed=1']
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    samples = runs[0].stdout.split('---------------\n')
    assert len(samples) == 3 and samples[2] == ''  # two samples, each followed by the separator
    for s in samples[:2]:
        assert s.startswith('def f(x):') and len(s) > len('def f(x):\n') + 5
    assert runs[1].stdout == runs[0].stdout  # same seed, same text


# ---------------------------------------------------------------------------
# the command line and the configurator


def test_command_line_run_and_error(tmp_path, data_dir):
    cfg_file = tmp_path / 'my_config.py'
    cfg_file.write_text(f"data_dir = {data_dir!r}\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n"
                        "batch_size = 2\neval_iters = 1\nlog_interval = 1\nwarmup_iters = 1\n")
    out_dir = str(tmp_path / 'out')
    ok = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), str(cfg_file), f'--out_dir={out_dir}',
                         '--max_iters=3', '--lr_decay_iters=3', '--pos_encoding=rope'],
                        capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert 'parameters' in ok.stdout and 'tokens per iteration: 1 x 2 x 16 = 32' in ok.stdout
    assert runtime.load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model_args']['pos_encoding'] == 'rope'
    bad = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), str(cfg_file), '--n_layers=3'],
                         capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert bad.returncode != 0
    assert "unknown setting 'n_layers'" in bad.stderr and "'n_layer'" in bad.stderr
    assert 'Traceback' not in bad.stderr  # one clear message, no stack trace


def test_unknown_key_names_the_closest_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting 'learnig_rate'.*'learning_rate'"):
        get_overrides(train.DEFAULTS, ['--learnig_rate=1e-3'], train.OPTIONAL_TYPES)
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("n_layer = 2\nbatchsize = 4\n")
    with pytest.raises(ConfigError, match=r"'batchsize' in config file .*c\.py.*'batch_size'"):
        get_overrides(train.DEFAULTS, [str(cfg_file)], train.OPTIONAL_TYPES)
    with pytest.raises(ConfigError, match='--key=value'):
        get_overrides(train.DEFAULTS, ['--n_layer'], train.OPTIONAL_TYPES)
    with pytest.raises(ConfigError, match='not found'):
        get_overrides(train.DEFAULTS, [str(tmp_path / 'missing.py')], train.OPTIONAL_TYPES)
    with pytest.raises(ConfigError, match="unknown setting 'n_layers' passed to train"):
        train.resolve_config({'n_layers': 2})


@pytest.mark.parametrize('arg, expected', [
    ('--n_layer=8', 8),
    ('--learning_rate=1', 1.0),          # an int is fine for a float
    ('--learning_rate=3e-4', 3e-4),
    ('--bias=True', True),
    ('--bias=false', False),
    ('--pos_encoding=rope', 'rope'),     # strings need no quotes
    ("--pos_encoding='rope'", 'rope'),
    ('--dataset=123', '123'),            # a string setting stays a string
    ('--rope_scaling=None', None),       # Optional settings take None
    ('--rope_scaling=yarn', 'yarn'),
    ('--rope_original_block_size=512', 512),
    ('--compile=False', False),
    ('--compile=auto', 'auto'),
])
def test_values_are_typed(arg, expected):
    value = get_overrides(train.DEFAULTS, [arg], train.OPTIONAL_TYPES)[arg[2:].split('=')[0]]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=8.5', r"'batch_size'.*must be int, got float 8\.5"),
    ('--batch_size=8.0', r"write 8"),
    ('--batch_size=abc', r"'batch_size'.*must be int, got str"),
    ('--batch_size=True', r"must be int, got bool"),
    ('--learning_rate=fast', r"'learning_rate'.*must be float"),
    ('--bias=maybe', r"'bias'.*must be bool"),
    ('--n_layer=None', r"'n_layer'.*must be int, got NoneType"),
    ('--rope_original_block_size=1.5', r"must be int or None"),
])
def test_wrong_types_fail(arg, message):
    with pytest.raises(ConfigError, match=message):
        get_overrides(train.DEFAULTS, [arg], train.OPTIONAL_TYPES)


def test_config_file_values_are_checked_and_later_arguments_win(tmp_path):
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("import math\n_helper = 3\nn_layer = 2 * _helper\nlearning_rate = 1\n")
    o = get_overrides(train.DEFAULTS, [str(cfg_file), '--n_layer=4'], train.OPTIONAL_TYPES)
    assert o == {'n_layer': 4, 'learning_rate': 1.0} and type(o['learning_rate']) is float
    o = get_overrides(train.DEFAULTS, ['--n_layer=4', str(cfg_file)], train.OPTIONAL_TYPES)
    assert o['n_layer'] == 6
    cfg_file.write_text("batch_size = 12.0\n")
    with pytest.raises(ConfigError, match=r"'batch_size' in config file.*write 12"):
        get_overrides(train.DEFAULTS, [str(cfg_file)], train.OPTIONAL_TYPES)


def test_train_defaults_mirror_gptconfig():
    """train.py has a setting for every model field (but vocab_size), with the model's default except
    for the model's size, which train.py sets smaller."""
    for f in fields(GPTConfig):
        if f.name not in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd'):
            assert train.DEFAULTS[f.name] == f.default, f.name
        assert f.name == 'vocab_size' or f.name in train.DEFAULTS
    assert 'vocab_size' not in train.DEFAULTS


def test_every_config_file_loads_and_checks():
    files = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
    assert len(files) >= 14
    loaded = {}
    for path in files:
        overrides = get_overrides(train.DEFAULTS, [path], train.OPTIONAL_TYPES)
        cfg, _ = train.resolve_config(overrides)  # type checks, then the settings and model checks
        loaded[os.path.basename(path)[:-3]] = cfg
    q = loaded['quickstart']
    assert (q['dataset'], q['tokenizer'], q['pos_encoding']) == ('pycode', 'byte', 'tapa')
    pes = ['tapa', 'rope', 'alibi', 'nope', 'learned']
    for pe in pes:
        tiny, gpu = loaded[f'tiny_{pe}'], loaded[f'pg19_gpt2_{pe}']
        assert tiny['pos_encoding'] == gpu['pos_encoding'] == pe
        assert (tiny['n_layer'], tiny['n_embd'], tiny['n_head'], tiny['block_size'], tiny['batch_size']) == (4, 128, 4, 128, 16)
        assert (tiny['dataset'], tiny['tokenizer']) == ('pg19', 'byte')
        # the tiny configs differ only in the positional encoding, its tuned peak learning rate (with
        # min_lr a tenth of it, as in every config) and where they write
        differ = {k for k in tiny if tiny[k] != loaded['tiny_rope'][k]}
        assert differ <= {'pos_encoding', 'out_dir', 'learning_rate', 'min_lr'}
        assert tiny['min_lr'] == pytest.approx(tiny['learning_rate'] / 10)
        assert (gpu['n_layer'], gpu['n_embd'], gpu['n_head'], gpu['tokenizer']) == (12, 768, 12, 'gpt2')
        assert gpu['block_size'] in (1024, 2048)
    assert len({loaded[f'tiny_{pe}']['out_dir'] for pe in pes}) == 5
    assert len({loaded[f'pg19_gpt2_{pe}']['out_dir'] for pe in pes}) == 5
    # the GPU TAPA config is the paper's TAPA exactly (Eq. 12: phase scale 1, quadratic phase, alpha 0.1,
    # theta 0.5) with everything else as RoPE's, its learning rate too (experiments/gpt2_tapa_setting.py)
    tapa, rope = loaded['pg19_gpt2_tapa'], loaded['pg19_gpt2_rope']
    assert {k for k in tapa if tapa[k] != rope[k]} == {'pos_encoding', 'out_dir'}
    assert (tapa['tapa_phase_scale'], tapa['tapa_phase'], tapa['tapa_alpha'], tapa['tapa_theta']) == (1.0, 'quadratic', 0.1, 0.5)
    # the small-model TAPA settings change only the phase (scale, type) and the learning rate
    small, linear = loaded['tiny_tapa_small'], loaded['tiny_tapa_small_linear']
    assert {k for k in small if small[k] != loaded['tiny_tapa'][k]} == {'tapa_phase_scale', 'learning_rate', 'min_lr', 'out_dir'}
    assert {k for k in linear if linear[k] != small[k]} == {'tapa_phase', 'out_dir'}
    assert (small['tapa_phase'], linear['tapa_phase']) == ('quadratic', 'linear')


# ---------------------------------------------------------------------------
# bad input: one clear error each


def test_missing_dataset_names_the_prepare_command(tmp_path):
    missing = str(tmp_path / 'data' / 'pg19' / 'byte')
    with pytest.raises(runtime.TrainError,
                       match=r"python data/pg19/prepare\.py --tokenizer byte --source \.\./shared/data/pg19_mini"):
        train.train({**TINY, 'dataset': 'pg19', 'data_dir': missing, 'out_dir': str(tmp_path / 'out')})
    with pytest.raises(runtime.TrainError, match=r"unknown dataset 'nosuch'.*pg19.*pycode"):
        train.train({**TINY, 'dataset': 'nosuch', 'out_dir': str(tmp_path / 'out')})


def test_pycode_is_prepared_on_first_use(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_prepare(tokenizer, out_dir):
        calls.append((tokenizer, out_dir))
        make_data(out_dir)
        return out_dir
    monkeypatch.setitem(sys.modules, 'data.pycode.prepare', types.SimpleNamespace(prepare=fake_prepare))
    # in its own folder, data/pycode/<tokenizer> (a --data_dir without data is an error instead: test_reliability)
    monkeypatch.setattr(train, 'REPO_ROOT', str(tmp_path))
    folder = str(tmp_path / 'data' / 'pycode' / 'byte')
    cfg, _ = train.resolve_config({**TINY, 'dataset': 'pycode'})
    data_dir, meta, paths, lengths = train.find_data(cfg)
    assert calls == [('byte', folder)] and data_dir == folder
    assert 'preparing the pycode dataset' in capsys.readouterr().out
    train.find_data(cfg)
    assert len(calls) == 1  # only on first use


def test_unknown_positional_encoding(tmp_path):
    with pytest.raises(ConfigError, match=r"pos_encoding='rotary' is not one of .*'tapa'.*'rope'"):
        train.train({**TINY, 'pos_encoding': 'rotary', 'out_dir': str(tmp_path)})


def test_block_size_larger_than_the_data(tmp_path):
    folder = make_data(tmp_path / 'small', n_train=5000, n_val=100)
    with pytest.raises(runtime.TrainError, match=r"validation split .* has 100 tokens.*block_size\+1 = 129"):
        train.train({**TINY, 'data_dir': folder, 'block_size': 128, 'out_dir': str(tmp_path / 'out')})
    # exactly block_size + 1 tokens is enough for one window
    cfg, _ = train.resolve_config({**TINY, 'data_dir': folder, 'block_size': 99})
    train.find_data(cfg)


@pytest.mark.parametrize('overrides, message', [
    ({'min_lr': -1.0}, r"min_lr=-1\.0 must be within \[0, learning_rate=0\.005\]"),  # else: negative rates
    ({'min_lr': 0.01}, r"min_lr=0\.01 must be within \[0, learning_rate=0\.005\]"),  # else: an lr that rises
    ({'warmup_iters': -1}, r"warmup_iters=-1 must be >= 0"),
    ({'pos_encoding': 'tapa', 'tapa_phase_warmup_iters': -5}, r"tapa_phase_warmup_iters=-5 must be >= 0"),  # else: no ramp
    ({'learning_rate': -1e-3}, r"learning_rate=-0\.001 must be >= 0"),
    ({'beta1': 1.0}, r"beta1=1\.0 must be within \[0, 1\)"),
    ({'beta2': -0.1}, r"beta2=-0\.1 must be within \[0, 1\)"),
    ({'weight_decay': -0.1}, r"weight_decay=-0\.1 must be >= 0"),
    ({'dropout': 1.0}, r"dropout=1\.0 must be within \[0, 1\)"),
    ({'dropout': -0.1}, r"dropout=-0\.1 must be within \[0, 1\)"),
    ({'seed': -1}, r"seed=-1 must be within \[0, 2\*\*32\)"),
    ({'seed': 2**32}, r"seed=4294967296 must be within \[0, 2\*\*32\)"),
    ({'n_head': 0}, r"n_head=0 is too small \(it must be at least 1\)"),  # else: ZeroDivisionError
    ({'n_embd': 0}, r"n_embd=0 is too small"),
    ({'n_layer': -1}, r"n_layer=-1 is too small"),
    ({'out_dir': ''}, r"out_dir='' must be a folder name"),
    ({'out_dir': __file__}, r"out_dir='.*test_train\.py' must be a folder, not an existing file"),
    ({'grad_clip': -1.0}, r"grad_clip=-1\.0 must be >= 0 \(the largest gradient norm; 0 = no clipping\)"),
    ({'tokenizer': 'bpe'}, r"tokenizer='bpe' must be one of \('byte', 'gpt2'\)"),
    ({'pos_encoding': 'rope', 'rope_base': 1.0}, r"rope_base=1\.0 must be > 1"),
    ({'pos_encoding': 'rope', 'rope_scaling': 'yarn', 'rope_factor': 2.0, 'yarn_beta_fast': 0.0},
     r"yarn_beta_fast=0\.0 must be > 0"),
    ({'pos_encoding': 'rope', 'rope_scaling': 'yarn', 'rope_factor': 2.0, 'yarn_beta_slow': -1.0},
     r"yarn_beta_slow=-1\.0 must be > 0"),
    ({'pos_encoding': 'rope', 'rope_scaling': 'pi', 'rope_factor': 2.0, 'rope_original_block_size': 0},
     r"rope_original_block_size=0 must be the pretraining context \(>= 1\), or None"),  # else: quietly block_size
    ({'pos_encoding': 'rope', 'rope_scaling': 'yarn', 'rope_factor': 2.0, 'rope_original_block_size': -5},
     r"rope_original_block_size=-5 must be"),  # else: a math domain error
    ({'attn_impl': 'fast'}, r"attn_impl='fast' is not one of"),
    ({'pos_encoding': 'rope', 'rope_factor': 0.25}, r"rope_factor=0\.25 does nothing without a rope_scaling"),
])
def test_out_of_range_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.resolve_config({**TINY, **overrides})


def test_range_checks_apply_only_where_a_setting_is_used():
    # RoPE's and YaRN's settings mean nothing to a TAPA model, min_lr nothing without decay_lr
    train.resolve_config({**TINY, 'pos_encoding': 'tapa', 'rope_base': 0.5, 'yarn_beta_fast': -1.0})
    train.resolve_config({**TINY, 'pos_encoding': 'rope', 'yarn_beta_slow': 0.0})  # no rope_scaling='yarn'
    train.resolve_config({**TINY, 'pos_encoding': 'rope', 'rope_original_block_size': 0})  # no rope_scaling
    train.resolve_config({**TINY, 'pos_encoding': 'rope', 'tapa_phase_warmup_iters': -5})  # not TAPA
    train.resolve_config({**TINY, 'decay_lr': False, 'min_lr': -1.0})
    # the edges of the ranges are in them; a learning rate of 0 is a run whose steps change nothing
    train.resolve_config({**TINY, 'learning_rate': 0.0, 'min_lr': 0.0, 'beta1': 0.0, 'dropout': 0.0,
                          'seed': 2**32 - 1, 'warmup_iters': 0, 'weight_decay': 0.0, 'grad_clip': 0.0})


def test_triton_attention_on_a_cpu_is_refused_before_anything_is_written(tmp_path, data_dir):
    out = tmp_path / 'run'
    with pytest.raises(ConfigError, match=r"attn_impl='triton' is a CUDA kernel and device=cpu.*'auto'"):
        train.train({**TINY, 'data_dir': data_dir, 'out_dir': str(out), 'attn_impl': 'triton', 'device': 'cpu'})
    assert not out.exists()


def test_unavailable_device_or_unknown_dtype_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # the same on a machine with a GPU
    with pytest.raises(ConfigError, match=r"device='cuda', but CUDA is not available here.*'cpu'"):
        runtime.pick_device('cuda')
    with pytest.raises(ConfigError, match=r"device='cuda:1', but CUDA is not available"):
        runtime.pick_device('cuda:1')
    with pytest.raises(ConfigError, match=r"device='gpu' is not a device name.*'cpu'"):
        runtime.pick_device('gpu')
    assert runtime.pick_device('cpu') == torch.device('cpu') and runtime.pick_device('auto').type != 'cuda'
    with pytest.raises(ConfigError, match=r"dtype='fp32' is not one of \('auto', 'float32', 'bfloat16', 'float16'\)"):
        runtime.pick_dtype('fp32', torch.device('cpu'))


def test_sample_bad_device_dtype_or_prompt_file(trained, tmp_path, monkeypatch):
    import sample
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    args = [f'--out_dir={trained[0]}', '--num_samples=1', '--max_new_tokens=2']
    with pytest.raises(ConfigError, match=r"device='cuda', but CUDA is not available"):
        sample.main(args + ['--device=cuda'])
    with pytest.raises(ConfigError, match=r"device='gpu' is not a device name"):
        sample.main(args + ['--device=gpu'])
    with pytest.raises(ConfigError, match=r"dtype='fp32' is not one of"):
        sample.main(args + ['--dtype=fp32'])
    missing = str(tmp_path / 'nonexistent.txt')
    with pytest.raises(ConfigError, match=r"--start=FILE:.*nonexistent\.txt: cannot read the prompt file .*No such file"):
        sample.main(args + [f'--start=FILE:{missing}'])
    with pytest.raises(ConfigError, match=r"temperature=1e-45: use 0 for greedy decoding"):  # else: inf logits
        sample.main(args + ['--temperature=1e-45'])
    assert len(sample.main(args + ['--temperature=1e-4', '--device=cpu'])) == 1  # the smallest allowed samples
    assert len(sample.main(args + ['--dtype=float16', '--device=cpu'])) == 1  # no training: no loss scaling needed


@pytest.mark.parametrize('change, message', [
    ({'pos_encoding': 'learned'}, r"missing: transformer\.wpe\.weight"),  # learned PEs have a table
    ({'n_layer': 1}, r"unexpected: transformer\.h\.1\."),
    ({'n_embd': 16}, r"of another shape: transformer\.wte\.weight \(256, 32\) \(the model's is \(256, 16\)\)"),
])
def test_weights_that_do_not_match_model_args(tmp_path, trained, change, message):
    """A checkpoint whose model_args were edited (or written by another model.py) does not fit its
    weights: every loader says so, naming the first keys that differ, instead of load_state_dict's error."""
    ckpt = runtime.load_checkpoint(os.path.join(trained[0], 'ckpt.pt'))
    ckpt['model_args'] = {**ckpt['model_args'], **change}
    with pytest.raises(runtime.TrainError, match=r"weights do not match its model_args.*" + message):
        runtime.model_from_checkpoint(ckpt)
    out_dir = str(tmp_path / 'out')
    os.makedirs(out_dir)
    torch.save(ckpt, os.path.join(out_dir, 'ckpt.pt'))
    with pytest.raises(runtime.TrainError, match=r"weights do not match its model_args.*" + message):
        train.train({'init_from': 'resume', 'out_dir': out_dir, 'max_iters': 31})


def test_model_args_from_another_version(trained):
    ckpt = runtime.load_checkpoint(os.path.join(trained[0], 'ckpt.pt'))
    ckpt['model_args'] = {**ckpt['model_args'], 'qk_norm': True}  # a field this model.py does not have
    with pytest.raises(runtime.TrainError, match=r"model_args has fields \['qk_norm'\].*another version"):
        runtime.model_from_checkpoint(ckpt)


def test_help_prints_usage_and_settings(trained, capsys):
    """-h or --help anywhere: the script's docstring and every setting with its default, exit status 0."""
    import sample
    with pytest.raises(SystemExit) as e:
        get_overrides(train.DEFAULTS, ['--n_layer=3', '--help'], train.OPTIONAL_TYPES, doc=train.__doc__)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'Train a GPT with a pluggable positional encoding' in out and "  --n_layer=6\n" in out
    with pytest.raises(SystemExit) as e:
        sample.main(['-h'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'Generate text from a trained checkpoint' in out and '  --num_samples=3\n' in out


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(runtime.TrainError, match=r"no checkpoint at .*ckpt\.pt"):
        train.train({'init_from': 'resume', 'out_dir': str(tmp_path / 'empty')})


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_corrupt_checkpoint(tmp_path, trained, damage):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(trained[0], out_dir)
    path = os.path.join(out_dir, 'ckpt.pt')
    with open(path, 'rb') as f:
        raw = f.read()
    with open(path, 'wb') as f:
        f.write(raw[:len(raw) // 2] if damage == 'truncate' else b'not a checkpoint' * 100)
    with pytest.raises(runtime.TrainError, match=r"cannot read the checkpoint .*ckpt\.pt.*truncated.*--init_from=scratch"):
        train.train({'init_from': 'resume', 'out_dir': out_dir})
    if damage == 'garbage':  # not a torch file at all: said so, not just its loader's KeyError
        with pytest.raises(runtime.TrainError, match=r"not a checkpoint at all \(torch\.save writes a zip archive"):
            runtime.load_checkpoint(path)


def test_checkpoint_missing_keys_or_other_version(tmp_path, trained):
    ckpt = torch.load(os.path.join(trained[0], 'ckpt.pt'), weights_only=True)
    path = str(tmp_path / 'ckpt.pt')
    torch.save({k: v for k, v in ckpt.items() if k != 'optimizer'}, path)
    with pytest.raises(runtime.TrainError, match="lacks optimizer"):
        runtime.load_checkpoint(path)
    torch.save({**ckpt, 'format_version': 99}, path)
    with pytest.raises(runtime.TrainError, match="format version 99"):
        runtime.load_checkpoint(path)


def test_resume_refuses_conflicting_architecture(trained):
    out_dir = trained[0]
    with pytest.raises(ConfigError, match=r"conflict.*n_layer=8 \(it has 2\).*pos_encoding='rope' \(it has 'tapa'\)"):
        train.resolve_config({'init_from': 'resume', 'out_dir': out_dir, 'pos_encoding': 'rope', 'n_layer': 8})
    # repeating the checkpoint's own values is fine; other settings may change; the rest come from it
    cfg, ckpt = train.resolve_config({'init_from': 'resume', 'out_dir': out_dir, 'n_layer': 2,
                                      'learning_rate': 1e-4, 'min_lr': 1e-5, 'dropout': 0.1})
    assert cfg['learning_rate'] == 1e-4 and cfg['min_lr'] == 1e-5 and cfg['dropout'] == 0.1
    assert cfg['batch_size'] == 8 and cfg['n_embd'] == 32 and cfg['out_dir'] == out_dir


def test_interrupt_says_what_there_is_to_continue_from(tmp_path, data_dir, trained, monkeypatch):
    """Ctrl-C: the message names this run's last checkpoint and its iteration, or says there is none
    yet -- also when the out_dir holds an earlier run's ckpt.pt, which a new run replaces."""
    get_lr = train.get_lr

    def interrupt_at(n):
        def lr(it, cfg):
            if it == n:
                raise KeyboardInterrupt
            return get_lr(it, cfg)
        monkeypatch.setattr(train, 'get_lr', lr)
    out_dir = str(tmp_path / 'out')
    shutil.copytree(trained[0], out_dir)  # an earlier run's ckpt.pt (iter 30) is there
    settings = {**TINY, 'data_dir': data_dir, 'out_dir': out_dir, 'max_iters': 20, 'eval_interval': 5}
    interrupt_at(3)
    with pytest.raises(KeyboardInterrupt, match=r'interrupted at iter 3, before this run saved a checkpoint'):
        train.train(settings)
    interrupt_at(7)  # saved at iter 5
    with pytest.raises(KeyboardInterrupt, match=r'interrupted at iter 7: continue from the last checkpoint, '
                                                r'.*ckpt\.pt at iter 5, with --init_from=resume'):
        train.train(settings)
    interrupt_at(12)  # resumed from 5, saved again at 10
    with pytest.raises(KeyboardInterrupt, match=r'at iter 10, with --init_from=resume'):
        train.train({'init_from': 'resume', 'out_dir': out_dir})
    assert runtime.load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['iter_num'] == 10


@pytest.mark.parametrize('caught_by', ['training loss', 'validation loss'])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, trained, caught_by):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(trained[0], out_dir)
    path = os.path.join(out_dir, 'ckpt.pt')
    before = sha256(path)
    # a learning rate of 1e30 makes the weights overflow float32 after one step (iter 30), so the loss
    # of iter 31 is not finite; with an evaluation (and always_save_checkpoint) at every iteration, the
    # evaluation at 31 sees it first and must not save the broken model either
    settings = {'init_from': 'resume', 'out_dir': out_dir, 'max_iters': 40, 'learning_rate': 1e30, 'decay_lr': False}
    if caught_by == 'training loss':
        settings.update(eval_interval=1000)
        message = r"the loss is (nan|inf) at iter 31"
    else:
        settings.update(eval_interval=1, always_save_checkpoint=True)
        message = r"the validation loss is (nan|inf) at iter 31"
    with pytest.raises(runtime.TrainError, match=message + r".*ckpt\.pt \(iter 30\) is the last good"):
        train.train(settings)
    assert sha256(path) == before
    assert not any(r['iter'] >= 31 for r in read_log(out_dir))


@pytest.mark.filterwarnings('ignore:CUDA is not available')  # autocast('cuda') made on a CPU-only machine
@pytest.mark.parametrize('capability,triton,dtype,compiles', [
    ((6, 1), True, 'float16', False),   # GTX 10xx: no bfloat16, and too old for Triton
    ((7, 5), True, 'float16', True),    # RTX 20xx / T4: bfloat16 only emulated
    ((8, 6), True, 'bfloat16', True),   # RTX 30xx
    ((8, 6), False, 'bfloat16', False),  # no Triton (e.g. PyTorch's Windows wheels)
])
def test_auto_dtype_and_compile_follow_the_gpu(monkeypatch, capability, triton, dtype, compiles):
    """dtype='auto' takes bfloat16 only where the tensor cores have it (torch.cuda.is_bf16_supported()
    says yes to emulation too); compile='auto' only where torch.compile's Triton code can run."""
    import torch.utils._triton
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: triton)
    gpu = torch.device('cuda')
    assert runtime.pick_dtype('auto', gpu) == dtype
    assert runtime.compiles_on(gpu) is compiles
    assert runtime.pick_dtype('auto', torch.device('cpu')) == 'float32' and not runtime.compiles_on(torch.device('cpu'))
    import eval_ppl
    assert eval_ppl.autocast_for(gpu).fast_dtype == getattr(torch, dtype)


def test_rng_state_is_the_training_gpus_only(monkeypatch):
    """A checkpoint keeps the random state of the GPU it trained on (dropout draws from it), not of
    every visible GPU: restoring those failed when the resumed run saw fewer GPUs, and put GPU 0's
    state back when it trained on another. Older checkpoints (a list, one per GPU) give the first."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': calls.append(('get', str(device))) or
                        torch.tensor([1, 2], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': calls.append(
        ('set', state.tolist(), str(device))))
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: pytest.fail('all GPUs touched'))
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: pytest.fail('all GPUs touched'))
    gen, gpu1 = torch.Generator(), torch.device('cuda', 1)
    states = runtime.rng_states(gen, gpu1)
    runtime.set_rng_states(states, gen, gpu1)
    old = dict(states, cuda=[torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)])
    runtime.set_rng_states(old, gen, torch.device('cuda', 0))
    runtime.set_rng_states(states, gen, torch.device('cpu'))  # resumed on a CPU: nothing to restore there
    assert calls == [('get', 'cuda:1'), ('set', [1, 2], 'cuda:1'), ('set', [7], 'cuda:0')]
    assert runtime.rng_states(gen, torch.device('cpu'))['cuda'] is None


@pytest.mark.filterwarnings('ignore:`torch.jit.script_method` is deprecated')  # from inside torch.compile
@pytest.mark.parametrize('pe,impl', [('tapa', 'naive'), ('tapa', 'chunked'), ('rope', 'auto')])
def test_compiled_training_matches_eager(tmp_path, data_dir, pe, impl):
    """train.py compiles the model on GPUs (compile='auto'); here on the CPU, so a model change that
    torch.compile cannot take (or computes differently) shows up without a GPU: the same steps,
    compiled and eager, log the same losses."""
    losses = {}
    for compile_ in (False, True):
        out_dir = str(tmp_path / f'out-{compile_}')
        train.train({**TINY, 'data_dir': data_dir, 'out_dir': out_dir, 'max_iters': 3, 'eval_interval': 3,
                     'eval_iters': 1, 'log_interval': 1, 'pos_encoding': pe, 'attn_impl': impl,
                     'block_size': 160 if impl == 'chunked' else 32, 'compile': compile_})
        losses[compile_] = [r['loss'] for r in read_log(out_dir) if 'loss' in r]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-4), losses


def test_a_schedule_longer_than_the_run_is_pointed_out(tmp_path, data_dir, capsys):
    """max_iters below lr_decay_iters: the run ends at a high learning rate, which a short README-style
    run does not mean to do; one line says so and how to fit the schedule (and nothing when it fits)."""
    settings = {**TINY, 'data_dir': data_dir, 'max_iters': 4, 'eval_interval': 4, 'warmup_iters': 1}
    train.train({**settings, 'out_dir': str(tmp_path / 'a')})
    assert 'note: max_iters=4 ends before the learning rate has decayed (lr_decay_iters=30); pass ' \
           '--lr_decay_iters=4' in capsys.readouterr().out
    train.train({**settings, 'out_dir': str(tmp_path / 'b'), 'lr_decay_iters': 4})
    assert 'lr_decay_iters' not in capsys.readouterr().out
