"""Nothing lost, nothing silent: damaged checkpoints, someone's data, two runs in one out_dir, OS
errors on the user's paths, token files that do not match their vocabulary, and the state that a
resume must bring back. Each test fails on the fault it names (the docstrings say which)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import REPO, SUBPROCESS_ENV, TINY, read_log, sha256  # noqa: E402
from test_train import data_dir, trained  # noqa: E402,F401  (fixtures: the tiny data, a 30-step run saved at 30)

import eval_ppl  # noqa: E402
import model  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from data.common import load_split, read_meta  # noqa: E402

torch.set_num_threads(1)


def copy_run(trained, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(trained[0], out_dir)
    return out_dir


# ---------------------------------------------------------------------------
# damaged checkpoints


def flip_byte_in_record(path, record_suffix='/data/0', offset=17):
    """Flip one byte inside a stored record of the zip archive torch.save writes (a weight tensor)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype='<u2')
        at = info.header_offset + 30 + int(name_len) + int(extra_len) + offset
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    return info.filename


def test_a_flipped_bit_in_the_weights_is_one_clear_error_and_nothing_is_overwritten(tmp_path, trained, capsys):
    """torch.load reads such a file without complaint (the damaged weights are simply used): checked
    here first, so the test shows what the CRC check adds."""
    out_dir = copy_run(trained, tmp_path)
    path = os.path.join(out_dir, 'ckpt.pt')
    record = flip_byte_in_record(path)
    torch.load(path, map_location='cpu', weights_only=True)  # loads: the damage would go unnoticed
    before = sha256(path)
    with pytest.raises(runtime.TrainError, match=rf"the checkpoint .*ckpt\.pt is damaged: its record {record} "
                                                 rf"fails its checksum"):
        train.train({'init_from': 'resume', 'out_dir': out_dir, 'max_iters': 40})
    assert sha256(path) == before  # the run that read it wrote nothing over it
    import sample
    with pytest.raises(runtime.TrainError, match='is damaged'):
        sample.main([f'--out_dir={out_dir}', '--device=cpu', '--max_new_tokens=2'])
    with pytest.raises(SystemExit, match='is damaged'):
        eval_ppl.main([f'--ckpt={out_dir}', '--lengths=16', f'--out={tmp_path / "ppl"}'])


# ---------------------------------------------------------------------------
# someone's data is never written into


def test_a_data_dir_no_prepare_step_made_is_never_written_into(tmp_path):
    """It used to be filled with the pycode dataset, replacing the user's train.bin."""
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'train.bin').write_bytes(b'my own tokens')
    with pytest.raises(runtime.TrainError, match=r"no prepared data in .*mine.*Prepare it first"):
        train.train({**TINY, 'data_dir': str(folder), 'out_dir': str(tmp_path / 'out')})
    assert (folder / 'train.bin').read_bytes() == b'my own tokens'


def test_prepare_refuses_token_files_it_did_not_write(tmp_path):
    from data.pycode.prepare import prepare
    from data.common import prepare_splits
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'train.bin').write_bytes(b'my own tokens')
    with pytest.raises(ValueError, match=r"holds token files \(train\.bin\) that preparing pycode did not write "
                                         r"\(no meta\.json .*--overwrite"):
        prepare(out_dir=str(folder), quiet=True, num_proc=1)
    assert (folder / 'train.bin').read_bytes() == b'my own tokens'
    # another dataset's folder is not pycode's to replace either
    text = tmp_path / 'doc.txt'
    text.write_text('hello world\n' * 50)
    other = tmp_path / 'other'
    prepare_splits(str(other), 'books', 'byte', {'train': [str(text)], 'validation': [str(text)]}, 'test', 1, True)
    with pytest.raises(ValueError, match=r"they belong to 'books'"):
        prepare_splits(str(other), 'pycode', 'byte', {'train': [str(text)]}, 'test', 1, True)
    # its own folder, complete or interrupted (meta.json gone, the .prepare note left), it prepares again
    import data.common
    real_write_split = data.common.write_split

    def interrupted(out_dir, split, *args):
        if split == 'validation':
            raise KeyboardInterrupt
        return real_write_split(out_dir, split, *args)
    data.common.write_split = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_splits(str(other), 'books', 'byte', {'train': [str(text)], 'validation': [str(text)]}, 'test', 1, True)
    finally:
        data.common.write_split = real_write_split
    assert not (other / 'meta.json').exists() and (other / 'train.bin').exists()
    prepare_splits(str(other), 'books', 'byte', {'train': [str(text)], 'validation': [str(text)]}, 'test', 1, True)
    assert read_meta(str(other))['dataset'] == 'books' and not (other / '.prepare').exists()
    # and --overwrite replaces someone's files when asked to
    prepare_splits(str(folder), 'books', 'byte', {'train': [str(text)], 'validation': [str(text)]}, 'test', 1, True,
                   overwrite=True)
    assert read_meta(str(folder))['dataset'] == 'books'


def test_prepare_command_line_says_it_in_one_line(tmp_path):
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'validation.bin').write_bytes(b'x')
    r = subprocess.run([sys.executable, 'data/pg19/prepare.py', '--tokenizer', 'byte', '--source', str(tmp_path),
                        '--out_dir', str(folder)], cwd=REPO, capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert r.returncode == 2 and 'refusing to overwrite them' in r.stderr and 'Traceback' not in r.stderr


# ---------------------------------------------------------------------------
# one run per out_dir, and a new run keeps the old one


def test_a_second_run_into_a_busy_out_dir_fails_at_once(tmp_path, data_dir):
    """The lock is the kernel's: a holder killed with -9 leaves nothing behind."""
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        import runtime
        lock = runtime.lock_out_dir({str(out_dir)!r})
        print('locked', flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        settings = {**TINY, 'data_dir': data_dir, 'out_dir': str(out_dir), 'max_iters': 2, 'eval_interval': 2}
        with pytest.raises(runtime.TrainError, match=rf"{out_dir} is in use by another run \(pid {holder.pid} on "):
            train.train(settings)
        assert not (out_dir / 'log.jsonl').exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train.train(settings)  # released by the kernel
    assert (out_dir / 'ckpt.pt').exists()


def test_a_new_run_keeps_the_previous_one_as_prev(tmp_path, data_dir, trained, capsys):
    """It used to empty log.jsonl at once and replace ckpt.pt at its first save: a new run that
    diverged at iter 1 left the old checkpoint without its log."""
    out_dir = copy_run(trained, tmp_path)
    ckpt, log = sha256(os.path.join(out_dir, 'ckpt.pt')), read_log(out_dir)
    settings = {**TINY, 'data_dir': data_dir, 'out_dir': out_dir, 'max_iters': 5,
                'learning_rate': 1e30, 'decay_lr': False, 'eval_interval': 100}
    with pytest.raises(runtime.TrainError, match='diverged'):
        train.train(settings)
    assert 'held a run, kept as ckpt.pt.prev and log.jsonl.prev' in capsys.readouterr().out
    assert sha256(os.path.join(out_dir, 'ckpt.pt.prev')) == ckpt
    with open(os.path.join(out_dir, 'log.jsonl.prev')) as f:
        assert [{k: v for k, v in json.loads(line).items() if k not in ('elapsed_s', 'tokens_per_s')}
                for line in f] == log


# ---------------------------------------------------------------------------
# OS errors on the user's paths: one line that names the path and the operation


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_tmp(tmp_path, trained, monkeypatch):
    out_dir = copy_run(trained, tmp_path)
    path = os.path.join(out_dir, 'ckpt.pt')
    before = sha256(path)

    def full_disk(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-write
        f.write(b'partial')
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(runtime.torch, 'save', full_disk)
    with pytest.raises(runtime.TrainError, match=r"cannot write the checkpoint .*ckpt\.pt \(\[enforce fail.*is the "
                                                 r"disk full\?\)\. The previous ckpt\.pt, if any, is intact"):
        train.train({'init_from': 'resume', 'out_dir': out_dir, 'max_iters': 40, 'eval_interval': 5})
    assert not os.path.exists(path + '.tmp') and sha256(path) == before
    monkeypatch.undo()
    train.train({'init_from': 'resume', 'out_dir': out_dir, 'max_iters': 35, 'eval_interval': 5})  # not blocked


def test_unwritable_or_impossible_out_dirs_are_one_line(tmp_path, data_dir, monkeypatch):
    settings = {**TINY, 'data_dir': data_dir, 'max_iters': 2, 'eval_interval': 2}
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    with pytest.raises(runtime.TrainError, match=rf"cannot create the folder {a_file}/out: Not a directory"):
        train.train({**settings, 'out_dir': str(a_file / 'out')})

    def denied(*a, **k):  # CI runs as root, where a read-only folder is writable: simulate it
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(os, 'makedirs', denied)
    with pytest.raises(runtime.TrainError, match=r"cannot create the folder .*ro: Permission denied"):
        train.train({**settings, 'out_dir': str(tmp_path / 'ro')})


def test_eval_ppl_checks_its_outputs_before_it_computes(tmp_path, trained, monkeypatch):
    monkeypatch.setattr(eval_ppl, 'evaluate', lambda *a, **k: pytest.fail('evaluated before checking the outputs'))
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    with pytest.raises(SystemExit, match=rf"error: cannot write the outputs to {a_file}/sub: Not a directory"):
        eval_ppl.main([f'--ckpt={trained[0]}', f'--out={a_file}/sub/ppl'])


# ---------------------------------------------------------------------------
# token files that do not match their vocabulary, and malformed meta.json


def test_tokens_outside_the_vocabulary_are_refused_at_load(tmp_path, data_dir):
    """They used to start normally and die at iter ~3 in the embedding lookup."""
    folder = str(tmp_path / 'data')
    shutil.copytree(data_dir, folder)
    meta = read_meta(folder)
    top = int(np.fromfile(os.path.join(folder, 'train.bin'), dtype=np.uint16).max())
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump({**meta, 'vocab_size': top}, f)  # one token fewer than the data uses
    with pytest.raises(ValueError, match=rf"train\.bin holds token {top}, outside the vocabulary of {top}"):
        load_split(folder, 'train')
    with pytest.raises(runtime.TrainError, match=f'outside the vocabulary of {top}'):
        train.train({**TINY, 'data_dir': folder, 'out_dir': str(tmp_path / 'out')})


@pytest.mark.parametrize('meta', [{'tokenizer': 'byte', 'vocab_size': 256, 'eot_token': 0}, [1, 2],
                                  {'tokenizer': 'byte', 'vocab_size': 256, 'eot_token': 0, 'splits': ['train']}])
def test_a_malformed_meta_json_is_a_clear_error(tmp_path, meta):
    (tmp_path / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta\.json is not the meta\.json a prepare step writes .*Prepare it again"):
        read_meta(str(tmp_path))


# ---------------------------------------------------------------------------
# the state a resume must bring back (each of these was once dropped without a test failing)


def test_resume_keeps_the_best_val_loss(tmp_path, trained, monkeypatch):
    """Forgetting it makes the first evaluation after a resume save, even when worse than the best."""
    out_dir = copy_run(trained, tmp_path)
    path = os.path.join(out_dir, 'ckpt.pt')
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, 'best_val_loss': -1.0}, path)  # a best that no evaluation can beat
    before = sha256(path)
    get_lr = train.get_lr

    def stop_after_the_evaluation_at_35(it, cfg):
        if it == 36:
            raise KeyboardInterrupt
        return get_lr(it, cfg)
    monkeypatch.setattr(train, 'get_lr', stop_after_the_evaluation_at_35)
    with pytest.raises(KeyboardInterrupt):
        train.train({'init_from': 'resume', 'out_dir': out_dir, 'max_iters': 50, 'eval_interval': 5})
    assert any(r['kind'] == 'eval' and r['iter'] == 35 for r in read_log(out_dir))  # it did evaluate
    assert sha256(path) == before  # and did not save a model worse than the best


def make_optimizer(betas, weight_decay):
    torch.manual_seed(0)
    gpt = model.GPT(model.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    return gpt, train.configure_optimizers(gpt, weight_decay, 1e-3, betas, 'cpu')


def test_restore_brings_back_the_loss_scale_and_takes_the_new_betas_and_weight_decay():
    """train.py scales float16 losses on CUDA; a CPU GradScaler has the same state to save."""
    gpt, opt = make_optimizer((0.9, 0.99), 0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=1234.0)
    cfg = train.Settings(beta1=0.9, beta2=0.99, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    ckpt = runtime.training_checkpoint(gpt, opt, scaler, cfg, 7, 1.5, [runtime.rng_states(gen, torch.device('cpu'))], 3.0)
    gpt2, opt2 = make_optimizer((0.9, 0.99), 0.1)
    scaler2 = torch.amp.GradScaler('cpu')
    assert scaler2.get_scale() != 1234.0
    new = train.Settings(beta1=0.5, beta2=0.6, weight_decay=0.3)
    assert runtime.restore_training(ckpt, gpt2, opt2, scaler2, gen, torch.device('cpu'), new) == (7, 1.5, 3.0)
    assert scaler2.get_scale() == 1234.0
    assert all(g['betas'] == (0.5, 0.6) for g in opt2.param_groups)
    assert opt2.param_groups[0]['weight_decay'] == 0.3 and opt2.param_groups[1]['weight_decay'] == 0.0


def test_alibi_bias_is_every_heads_slope_times_the_distance():
    """Per pair, from the paper's slopes 2^(-8(h+1)/H) (H a power of 2), not from alibi_slopes."""
    H, Tq, Tk = 8, 3, 7
    bias = model.alibi_bias(model.alibi_slopes(H), Tq, Tk, 'cpu')
    for h in range(H):
        for i in range(Tq):
            for n in range(Tk):
                m = Tk - Tq + i
                expected = -2 ** (-8 * (h + 1) / H) * (m - n) if n <= m else 0.0
                assert bias[h, i, n].item() == pytest.approx(expected, abs=1e-7), (h, i, n)


# ---------------------------------------------------------------------------
# killed while it writes a checkpoint: what is on disk always loads, and the next run goes on


SLOW_SAVE = """
import io, sys, time
sys.path.insert(0, {repo!r})
import torch
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # the same bytes, written slowly: a kill lands mid-write
    buffer = io.BytesIO()
    real_save(obj, buffer)
    with open({marker!r}, 'a') as m:
        m.write('saving\\n')
    data = buffer.getvalue()
    for i in range(0, len(data), 2048):
        f.write(data[i:i + 2048])
        f.flush()
        time.sleep(0.001)

torch.save = slow_save
import train
train.train({settings!r})
"""


@pytest.mark.parametrize('delay', [0.005, 0.02, 0.05])
def test_a_kill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path, data_dir, delay):
    out_dir, marker = str(tmp_path / 'out'), str(tmp_path / 'saves')
    settings = {**TINY, 'data_dir': data_dir, 'out_dir': out_dir, 'max_iters': 200, 'eval_interval': 1,
                'eval_iters': 1, 'always_save_checkpoint': True}
    proc = subprocess.Popen([sys.executable, '-c', SLOW_SAVE.format(repo=REPO, marker=marker, settings=settings)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)
    deadline = time.time() + 60
    while time.time() < deadline and (not os.path.exists(marker) or open(marker).read().count('saving') < 3):
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = runtime.load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))  # whole and verified
    assert ckpt['iter_num'] >= 2
    result = train.train({'init_from': 'resume', 'out_dir': out_dir, 'max_iters': ckpt['iter_num'] + 2,
                          'eval_interval': 1, 'eval_iters': 1})  # a leftover .tmp blocks nothing
    assert result['iter_num'] == ckpt['iter_num'] + 2
