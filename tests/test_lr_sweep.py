"""experiments/lr_sweep.py end to end with tiny settings: every (encoding, rate) run trained with the
rate it claims, the table's best is the lowest final validation loss read back from each run's own
log, finished runs are not rerun, and bad settings fail with one line."""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'experiments'))
sys.path.insert(0, os.path.join(REPO, 'tests'))
import lr_sweep  # noqa: E402
from configurator import ConfigError  # noqa: E402
from test_finetune import make_data  # noqa: E402

torch.set_num_threads(1)


def test_lr_sweep_quick_trains_each_rate_and_picks_the_lowest_validation_loss(tmp_path, capsys):
    data = make_data(tmp_path / 'data', n_docs=(6, 3), doc_len=1500)
    out = tmp_path / 'sweep'
    args = ['--quick', f'--out={out}', f'--data_dir={data}', '--encodings=rope,alibi', '--lrs=3e-3,1e-3']
    summary = lr_sweep.main(args)
    for pe in ('rope', 'alibi'):
        losses = {}
        for lr in ('0.001', '0.003'):
            run = out / 'ckpt' / f'{pe}-lr{lr}'
            records = [json.loads(line) for line in open(run / 'log.jsonl')]
            steps = [r for r in records if r['kind'] != 'eval']
            assert max(r['lr'] for r in steps) == pytest.approx(float(lr))  # its peak is the rate it claims
            assert min(r['lr'] for r in records) == pytest.approx(float(lr) / 10)  # and min_lr = lr / 10
            losses[float(lr)] = [r['val_loss'] for r in records if r['kind'] == 'eval'][-1]
            assert summary['val_loss'][pe][lr] == pytest.approx(losses[float(lr)])
        assert summary['best_lr'][pe] == min(losses, key=losses.get)
    md = open(out / 'results.md').read()
    assert '| tiny_rope |' in md and '| tiny_alibi |' in md and md.count('**') == 4  # one bold best per row
    capsys.readouterr()
    lr_sweep.main(args)  # again: nothing is retrained
    assert capsys.readouterr().out.count('finished before, not rerun') == 4
    lr_sweep.main(args + ['--seed=7'])  # the same folders, other settings: every run is trained again
    assert 'finished before' not in capsys.readouterr().out
    from runtime import load_checkpoint
    assert load_checkpoint(str(out / 'ckpt' / 'rope-lr0.001' / 'ckpt.pt'))['config']['seed'] == 7


@pytest.mark.parametrize('arg,message', [('--encodings=rope,nosuch', 'there is no configs/tiny_nosuch.py'),
                                         ('--lrs=1e-3,x', 'comma-separated numbers'),
                                         ('--lrs=-1e-3', 'positive')])
def test_lr_sweep_bad_settings(tmp_path, arg, message):
    with pytest.raises(ConfigError, match=message):
        lr_sweep.main(['--quick', f'--out={tmp_path / "s"}', arg])


def test_lr_sweep_quick_never_uses_the_full_sweeps_folder(tmp_path):
    with pytest.raises(ConfigError, match='where the full sweep keeps its results'):
        lr_sweep.main(['--quick', '--out=runs/lr_sweep'])
