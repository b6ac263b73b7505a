"""experiments/gpt2_tapa_setting.py: each setting trains with what it claims, the table reads each run's
own log, finished runs are not rerun, its count models match a per-pair loop, bad settings fail in one line."""
import collections
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'experiments'))
sys.path.insert(0, os.path.join(REPO, 'tests'))
import gpt2_tapa_setting as g  # noqa: E402
import lr_sweep  # noqa: E402
import paper_in_miniature  # noqa: E402
from configurator import ConfigError  # noqa: E402
from test_finetune import make_data  # noqa: E402

torch.set_num_threads(1)


def gpt2_data(folder):
    """test_finetune's byte data relabelled as GPT-2 tokens (bytes are valid GPT-2 ids), as the configs want."""
    make_data(folder, n_docs=(6, 3), doc_len=1500)
    with open(folder / 'meta.json') as f:
        meta = json.load(f)
    meta.update(tokenizer='gpt2', vocab_size=50257, eot_token=50256)
    for split in ('train', 'validation'):  # each document ends with GPT-2's EOT instead of the byte 0
        tokens = np.fromfile(folder / f'{split}.bin', dtype=np.uint16)
        tokens[np.load(folder / f'{split}.docs.npy')[1:] - 1] = 50256
        tokens.tofile(folder / f'{split}.bin')
    with open(folder / 'meta.json', 'w') as f:
        json.dump(meta, f)
    return folder


def test_quick_trains_each_setting_as_it_claims_and_tabulates_its_own_log(tmp_path, capsys):
    data = gpt2_data(tmp_path / 'data')
    out = tmp_path / 'check'
    args = ['--quick', f'--out={out}', f'--data_dir={data}', '--settings=paper,small_linear,rope', '--iters=3']
    summary = g.main(args)
    from runtime import load_checkpoint
    want = {'paper': dict(pos_encoding='tapa', tapa_phase_scale=1.0, tapa_phase='quadratic', learning_rate=1.2e-4),
            'small_linear': dict(pos_encoding='tapa', tapa_phase_scale=0.05, tapa_phase='linear', learning_rate=6e-4),
            'rope': dict(pos_encoding='rope', learning_rate=6e-4)}
    for name, claims in want.items():
        run = out / 'ckpt' / f'{name}-s1337'
        ck = load_checkpoint(str(run / 'ckpt.pt'))
        got = {**ck['config'], **ck['model_args']}
        for k, v in claims.items():  # the setting it claims to be
            assert got[k] == (pytest.approx(v) if isinstance(v, float) else v), (name, k)
        assert got['n_embd'] // got['n_head'] == 64 and got['tokenizer'] == 'gpt2'  # GPT-2's head dim and BPE
        last = [json.loads(line) for line in open(run / 'log.jsonl') if '"eval"' in line][-1]
        assert last['iter'] == 3 and summary['val_loss'][name]['3']['mean'] == pytest.approx(last['val_loss'])
    md = open(out / 'results.md').read()
    assert '| paper |' in md and '| rope |' in md and 'bigram' in md
    capsys.readouterr()
    g.main(args)  # again: nothing is retrained
    assert capsys.readouterr().out.count('finished before, not rerun') == 3


def test_count_models_match_a_loop_over_the_pairs(tmp_path):
    folder = tmp_path / 'd'
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    V = 7
    train, val = rng.integers(0, V, 300), rng.integers(0, V - 1, 80)  # (token V-1 never in val: fine either way)
    train[::5] = 3  # some structure, so the bigram differs from the unigram
    for name, x in (('train', train), ('validation', val)):
        x.astype(np.uint16).tofile(folder / f'{name}.bin')
    json.dump({'vocab_size': V}, open(folder / 'meta.json', 'w'))
    got = g.count_model_losses(str(folder), betas=(0.5, 2.0))
    uni = collections.Counter(train.tolist())
    p = {t: (uni[t] + 1) / (len(train) + V) for t in range(V)}
    assert got['unigram'] == pytest.approx(-sum(math.log(p[t]) for t in val) / len(val))
    pair, first = collections.Counter(zip(train[:-1].tolist(), train[1:].tolist())), collections.Counter(train[:-1].tolist())
    for beta in (0.5, 2.0):
        ce = -sum(math.log((pair[(a, b)] + beta * p[b]) / (first[a] + beta)) for a, b in zip(val[:-1], val[1:])) / (len(val) - 1)
        assert got['bigram'] <= ce + 1e-12  # the best beta is at least as good as each
        if beta == got['bigram_beta']:
            assert got['bigram'] == pytest.approx(ce)


@pytest.mark.parametrize('arg,message', [('--settings=paper,nosuch', "unknown setting 'nosuch'"),
                                         ('--seeds=0', 'at least 1'), ('--iters=2', 'at least 3')])
def test_bad_settings(tmp_path, arg, message):
    with pytest.raises(ConfigError, match=message):
        g.main(['--quick', f'--out={tmp_path / "s"}', f'--data_dir={gpt2_data(tmp_path / "d")}', arg])


@pytest.mark.parametrize('arg,message', [('--jobs=0', 'at least 1 job'), ('--threads=-1', 'or more threads'),
                                         ('--out=FILE', 'is a file, not a folder')])
def test_bad_run_settings_of_every_experiment_script(tmp_path, arg, message):
    """script_settings, shared by experiments/gpt2_tapa_setting.py, lr_sweep.py and paper_in_miniature.py."""
    (tmp_path / 'file').write_text('not a folder')
    arg = arg.replace('FILE', str(tmp_path / 'file'))
    for main in (g.main, lr_sweep.main, paper_in_miniature.main):
        with pytest.raises(ConfigError, match=message):
            main(['--quick', f'--out={tmp_path / "s"}', arg])


def test_missing_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ConfigError, match='prepare.py --tokenizer gpt2'):
        g.main(['--quick', f'--out={tmp_path / "s"}', f'--data_dir={tmp_path / "none"}'])


def test_quick_never_uses_the_full_comparisons_folder():
    with pytest.raises(ConfigError, match='where the full comparison keeps its results'):
        g.main(['--quick', '--out=runs/gpt2_tapa_setting'])
