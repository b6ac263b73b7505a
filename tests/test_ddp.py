"""More than one process: train.py under torchrun (DistributedDataParallel, gloo on the CPU), and
activation checkpointing. Small on purpose: 2 processes, a 2-layer model, a few steps."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import REPO, SUBPROCESS_ENV, make_data  # noqa: E402

import model  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
SETTINGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, eval_interval=4,
                warmup_iters=2, lr_decay_iters=12, max_iters=12, learning_rate=5e-3, min_lr=1e-3, device='cpu',
                log_interval=1, gradient_accumulation_steps=2, always_save_checkpoint=True)
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('data') / 'tiny' / 'byte')


def args(**settings):
    return [f'--{k}={v}' for k, v in settings.items()]


def run(launcher, script, settings, timeout=240):
    t0 = time.time()
    r = subprocess.run(launcher + [script] + args(**settings), cwd=REPO, capture_output=True, text=True,
                       env=SUBPROCESS_ENV, timeout=timeout)
    return r, time.time() - t0


def losses(out_dir):
    """iter -> training loss, and the final weights."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        curve = {r['iter']: r['loss'] for r in map(json.loads, f) if r['kind'] == 'train'}
    return curve, torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['model']


def assert_same(a, b, tol):
    assert a[0].keys() == b[0].keys()
    for it in a[0]:
        assert abs(a[0][it] - b[0][it]) <= tol, (it, a[0][it], b[0][it])
    for k in a[1]:
        assert (a[1][k] - b[1][k]).abs().max().item() <= tol, k


@pytest.mark.parametrize('pe', ['tapa', 'alibi'])
def test_two_processes_train_as_one(tmp_path, data_dir, pe):
    """Same batches, gradients averaged once per step: the same losses and weights as one process with
    the same gradient_accumulation_steps. TAPA and ALiBi register buffers, which DDP broadcasts on every
    forward: the evaluations (every 4 steps) must not hang on them."""
    s = {**SETTINGS, 'data_dir': data_dir, 'pos_encoding': pe}
    one, _ = run([sys.executable], 'train.py', {**s, 'out_dir': tmp_path / 'one'})
    two, seconds = run(TORCHRUN, 'train.py', {**s, 'out_dir': tmp_path / 'two'})
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert_same(losses(tmp_path / 'one'), losses(tmp_path / 'two'), 1e-5)
    assert two.stdout.count('tokens per iteration: 2 x 4 x 32') == 1  # rank 0 alone prints


def test_an_indivisible_accumulation_is_refused(tmp_path, data_dir):
    r, _ = run(TORCHRUN, 'train.py', {**SETTINGS, 'data_dir': data_dir, 'out_dir': tmp_path / 'o',
                                      'gradient_accumulation_steps': 3})
    assert r.returncode != 0
    assert 'gradient_accumulation_steps=3 is the number of micro-batches of a step in all processes together: ' \
           'it must be a multiple of the 2 processes' in r.stderr + r.stdout


KILL_AT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train
get_lr = train.get_lr

def lr(it, cfg):  # rank {rank} dies at iter {at}: after the checkpoint of iter 4, before that of 8
    if it == {at} and os.environ.get('RANK', '0') == '{rank}':
        {action}
    return get_lr(it, cfg)
train.get_lr = lr
try:
    train.train(train.get_overrides(train.DEFAULTS, sys.argv[1:], train.OPTIONAL_TYPES))
except (train.ConfigError, train.TrainError) as e:
    sys.exit(f"error: {{e}}")
"""


def test_a_killed_run_resumes_with_one_or_two_processes(tmp_path, data_dir):
    s = {**SETTINGS, 'data_dir': data_dir}
    whole, _ = run(TORCHRUN, 'train.py', {**s, 'out_dir': tmp_path / 'whole'})
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = losses(tmp_path / 'whole')
    script = tmp_path / 'kill.py'
    script.write_text(KILL_AT.format(repo=REPO, rank=0, at=6, action='os.kill(os.getpid(), signal.SIGKILL)'))
    killed, _ = run(TORCHRUN, str(script), {**s, 'out_dir': tmp_path / 'killed'})
    assert killed.returncode != 0
    for n, launcher in ((2, TORCHRUN), (1, [sys.executable])):
        out = tmp_path / f'resumed{n}'
        out.mkdir()
        for name in ('ckpt.pt', 'log.jsonl'):
            (out / name).write_bytes((tmp_path / 'killed' / name).read_bytes())
        assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 4
        r, _ = run(launcher, 'train.py', {'init_from': 'resume', 'out_dir': out, 'device': 'cpu'})
        assert r.returncode == 0, r.stderr[-3000:]
        # the same processes: every rank's random states back, bit for bit; one process: the same batches
        assert_same(reference, losses(out), 0.0 if n == 2 else 1e-5)


def test_an_error_on_one_rank_ends_every_rank(tmp_path, data_dir):
    script = tmp_path / 'fail.py'
    script.write_text(KILL_AT.format(repo=REPO, rank=1, at=3, action="raise train.TrainError('injected on rank 1')"))
    r, seconds = run(TORCHRUN, str(script), {**SETTINGS, 'data_dir': data_dir, 'out_dir': tmp_path / 'o',
                                             'max_iters': 1000, 'lr_decay_iters': 1000}, timeout=120)
    assert r.returncode != 0 and 'error: injected on rank 1' in r.stderr + r.stdout
    assert seconds < 30, f"{seconds:.0f} s: the other rank waited for the failed one"


def test_evaluation_refuses_torchrun(tmp_path):
    script = tmp_path / 'x.py'
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        import eval_ppl
        eval_ppl.main(['--ckpt=nowhere'])
        """))
    r, _ = run(TORCHRUN, str(script), {})
    assert r.returncode != 0 and 'eval_ppl.py runs in one process: start it with python, not torchrun' in r.stderr


# ---------------------------------------------------------------------------
# activation checkpointing: the same function and gradients, less memory


@pytest.mark.parametrize('pe,impl', [('tapa', 'naive'), ('tapa', 'chunked'), ('rope', 'auto'), ('alibi', 'auto')])
def test_activation_checkpointing_changes_nothing_but_memory(pe, impl):
    grads = {}
    for on in (False, True):
        torch.manual_seed(0)
        gpt = model.GPT(model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=61,
                                        pos_encoding=pe, attn_impl=impl, activation_checkpointing=on))
        idx = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(1))
        _, loss = gpt(idx, targets=idx)
        loss.backward()
        grads[on] = (loss.item(), {n: p.grad.clone() for n, p in gpt.named_parameters()})
    assert abs(grads[True][0] - grads[False][0]) <= 1e-6
    for n, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][n], g, rtol=0, atol=1e-6)


def test_activation_checkpointing_is_not_an_architecture_setting(tmp_path, data_dir):
    """A resume may switch it on (to fit a longer fine-tune) or off."""
    out = str(tmp_path / 'o')
    train.train({**SETTINGS, 'data_dir': data_dir, 'out_dir': out, 'max_iters': 4, 'gradient_accumulation_steps': 1})
    result = train.train({'init_from': 'resume', 'out_dir': out, 'max_iters': 6, 'activation_checkpointing': True})
    assert result['model'].config.activation_checkpointing and result['iter_num'] == 6
