"""
Tests of the long-context evaluations, eval_ppl.py and eval_passkey.py, on tiny random models and
token files written here (no training, no prepared data needed).

The sliding-window arithmetic is checked by counting, the sliding-window NLL against a loop that
runs the model once per scored token on the window the protocol gives it, and the passkey prompt by
decoding it and looking for the key.
"""

import csv
import importlib.util
import json
import math
import os
import random
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TIKTOKEN_CACHE = os.path.normpath(os.path.join(REPO, '..', 'shared', 'tiktoken_cache'))
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(TIKTOKEN_CACHE):
    os.environ['TIKTOKEN_CACHE_DIR'] = TIKTOKEN_CACHE  # the offline GPT-2 files, if present

import eval_passkey  # noqa: E402
import eval_ppl  # noqa: E402
import sample  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

torch.set_num_threads(1)

HAS_MATPLOTLIB = importlib.util.find_spec('matplotlib') is not None


def tiny_gpt(pe='tapa', block_size=8, vocab_size=256, sharpen=True, **kw):
    """A 2-layer random GPT. sharpen scales the weights up so the predictions are far from uniform
    (a wrong token or position then changes the loss visibly)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size, vocab_size=vocab_size,
                          pos_encoding=pe, **kw))
    if sharpen:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
    return model.eval()


def save_checkpoint(model, out_dir, dataset='toy', tokenizer='byte'):
    """A checkpoint in train.py's format (everything loadable with torch.load(weights_only=True))."""
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = {'model': model.state_dict(), 'optimizer': {}, 'scaler': None,
                  'model_args': asdict(model.config),
                  'config': {'dataset': dataset, 'tokenizer': tokenizer, 'data_dir': '',
                             'block_size': model.config.block_size, 'out_dir': out_dir},
                  'iter_num': 0, 'best_val_loss': 1.0, 'rng': {'torch': torch.get_rng_state()},
                  'format_version': 1}
    torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt'))
    return out_dir


def write_split(data_dir, docs, split='validation', tokenizer='byte', vocab_size=256, eot=0):
    """A prepared split in the data format (each document followed by EOT), written with plain numpy."""
    os.makedirs(data_dir, exist_ok=True)
    tokens = np.concatenate([np.append(np.asarray(d, dtype=np.uint16), eot) for d in docs]).astype(np.uint16)
    offsets = np.cumsum([0] + [len(d) + 1 for d in docs]).astype(np.int64)
    tokens.tofile(os.path.join(data_dir, f'{split}.bin'))
    np.save(os.path.join(data_dir, f'{split}.docs.npy'), offsets)
    meta = {'dataset': 'toy', 'tokenizer': tokenizer, 'vocab_size': vocab_size, 'eot_token': eot,
            'dtype': 'uint16', 'splits': {split: {'tokens': int(len(tokens)), 'docs': len(docs)}}, 'source': 'test'}
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return data_dir


# ---------------------------------------------------------------------------
# the sliding-window protocol


def test_sliding_windows_by_hand():
    # 12 tokens -> predictions at positions 0..10; L=4, S=2
    assert eval_ppl.sliding_windows(12, 4, 2) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8), (7, 11, 10)]
    # S = L: back-to-back chunks; the last one reuses context to stay L long
    assert eval_ppl.sliding_windows(11, 4, 4) == [(0, 4, 0), (4, 8, 4), (6, 10, 8)]
    assert eval_ppl.sliding_windows(1, 4, 2) == []  # a lone token has nothing to predict


@pytest.mark.parametrize('doc_len,L,S', [
    (100, 16, 5), (100, 16, 16), (100, 16, 100), (17, 16, 4), (16, 16, 4), (2, 16, 4), (50, 7, 3),
    (33, 8, 8), (34, 8, 8), (1000, 64, 256), (65, 64, 1), (30, 1, 1), (200, 32, 7)])
def test_sliding_windows_score_each_token_once_with_enough_context(doc_len, L, S):
    windows = eval_ppl.sliding_windows(doc_len, L, S)
    s_eff = min(S, L)
    scored = []
    for k, (start, end, score_from) in enumerate(windows):
        assert 0 <= start <= score_from < end <= doc_len - 1  # the output at end-1 predicts token end
        assert end - start == min(L, doc_len - 1)  # every window is L long when the document allows it
        for p in range(score_from, end):
            scored.append(p + 1)  # the token this output predicts
            context = p - start + 1  # tokens the model has seen when predicting token p+1
            if k == 0:
                assert start == 0 and context == p + 1  # first window: all the document has so far
            else:
                assert context >= L - s_eff + 1
    # every token except the first is scored, exactly once
    assert sorted(scored) == list(range(1, doc_len))
    if s_eff == L:  # stride L: no window re-reads context it scored, except the last
        assert all(start == score_from for start, _, score_from in windows[1:-1])


@pytest.mark.parametrize('pe,kw', [('tapa', {}), ('tapa', {'attn_impl': 'chunked'}), ('alibi', {}),
                                   ('rope', {'rope_scaling': 'dynamic_ntk', 'rope_factor': 2.0})])
def test_sliding_window_nll_equals_a_per_token_loop(pe, kw):
    model = tiny_gpt(pe, block_size=8, vocab_size=64, **kw)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 64, n) for n in (40, 29, 13, 9)]
    L, S = 12, 5
    got = eval_ppl.sliding_window_nll(model, docs, L, S, batch_size=3)

    expected, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            n = len(doc)
            for t in range(1, n):  # token t is predicted by the output at position t-1
                p = t - 1
                if p < L:  # the first window [0, L) scores positions 0..L-1
                    start, end = 0, min(L, n - 1)
                else:  # later windows end at L + kS (or the document's end) and score the S before
                    end = min(L + ((p - L) // S + 1) * S, n - 1)
                    start = end - L
                x = torch.tensor(doc[start:end], dtype=torch.long)[None]
                logits, _ = model(x, targets=torch.zeros_like(x))  # with targets: logits at every position
                expected -= F.log_softmax(logits[0, p - start].double(), dim=-1)[int(doc[t])].item()
                count += 1
    assert got['tokens'] == count == sum(len(d) - 1 for d in docs)
    assert got['nll'] / count > 1.0  # sharpened random weights: far from a trivial loss
    assert got['nll'] == pytest.approx(expected, rel=1e-5)


def test_output_layer_chunking_does_not_change_the_nll():
    model = tiny_gpt('tapa', vocab_size=64)
    docs = [np.random.default_rng(2).integers(0, 64, 50)]
    a = eval_ppl.sliding_window_nll(model, docs, 16, 16, batch_size=4, head_rows=1024)
    b = eval_ppl.sliding_window_nll(model, docs, 16, 16, batch_size=1, head_rows=7)
    assert a['nll'] == pytest.approx(b['nll'], rel=1e-6) and a['tokens'] == b['tokens'] == 49


def test_dyadic_lengths():
    assert eval_ppl.dyadic_lengths(256) == [256, 512, 1024, 2048, 4096]
    assert eval_ppl.dyadic_lengths(100, 4) == [100, 200, 400]
    assert eval_ppl.dyadic_lengths(256, 16, 0.5) == [128, 256, 512, 1024, 2048, 4096]
    assert eval_ppl.parse_lengths('512,128, 256') == [128, 256, 512]
    with pytest.raises(ValueError):
        eval_ppl.parse_lengths('128,lots')


def test_document_selection_is_deterministic_and_bounded():
    lengths = [5, 40, 100, 17, 300]
    # L=16: documents of at least 17 tokens, in order
    assert eval_ppl.select_documents(lengths, 16) == [(1, 40), (2, 100), (3, 17), (4, 300)]
    assert eval_ppl.select_documents(lengths, 16, max_docs=2) == [(1, 40), (2, 100)]
    # a budget of 40 scored tokens: 2 documents of 20 scored tokens (21 tokens) each
    assert eval_ppl.select_documents(lengths, 16, max_tokens=40) == [(1, 21), (2, 21)]
    # a budget smaller than one window still scores one full window
    assert eval_ppl.select_documents(lengths, 64, max_tokens=10) == [(2, 65)]
    assert eval_ppl.select_documents(lengths, 300) == []


def test_config_parsing_rejects_unknown_and_mistyped_settings():
    defaults = eval_ppl.default_config()
    cfg = eval_ppl.parse_config(['--lengths=256,512', '--ckpt=out-a,out-b', '--rope_factor=4', '--stride=128'],
                                defaults)
    assert cfg['lengths'] == '256,512' and cfg['ckpt'] == 'out-a,out-b'
    assert cfg['rope_factor'] == 4.0 and cfg['stride'] == 128 and cfg['split'] == 'validation'
    with pytest.raises(ValueError, match='lenghts'):
        eval_ppl.parse_config(['--lenghts=256'], defaults)
    with pytest.raises(ValueError):
        eval_ppl.parse_config(['--stride=a lot'], defaults)
    with pytest.raises(ValueError):
        eval_passkey.parse_config(['--num_trails=3'], eval_passkey.default_config())


def test_rope_scaling_override_needs_a_factor():
    with pytest.raises(ValueError, match='rope_factor'):
        eval_ppl.apply_overrides(tiny_gpt('rope'), rope_scaling='yarn')
    with pytest.raises(ValueError, match=r'rope_factor=4 does nothing without a rope_scaling'):  # else: ignored
        eval_ppl.apply_overrides(tiny_gpt('rope'), rope_factor=4.0)
    model = tiny_gpt('rope')
    eval_ppl.apply_overrides(model, rope_scaling='yarn', rope_factor=4.0)
    cfg = model.config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_block_size, cfg.block_size) == ('yarn', 4.0, 8, 8)
    assert eval_ppl.describe(cfg) == 'rope yarn x4'
    tapa = tiny_gpt('tapa')
    assert eval_ppl.apply_overrides(tapa, rope_scaling='yarn', rope_factor=4.0) == ['rope_factor', 'rope_scaling']
    assert tapa.config.rope_scaling is None


# ---------------------------------------------------------------------------
# eval_ppl.py end to end


@pytest.mark.parametrize('same_docs', [True, False])
def test_eval_ppl_writes_table_json_csv_and_reports_learned_beyond_its_context(tmp_path, capsys, same_docs):
    rng = np.random.default_rng(3)
    doc_lengths = [40, 12, 25, 7]  # + EOT: 41, 13, 26, 8 tokens
    data_dir = write_split(str(tmp_path / 'data'), [rng.integers(1, 256, n) for n in doc_lengths])
    a = save_checkpoint(tiny_gpt('tapa'), str(tmp_path / 'out-tapa'))
    b = save_checkpoint(tiny_gpt('learned'), str(tmp_path / 'out-learned'))
    c = save_checkpoint(tiny_gpt('rope'), str(tmp_path / 'out-rope'))
    prefix = str(tmp_path / 'results' / 'ppl')
    eval_ppl.main([f'--ckpt={a},{b},{c}/ckpt.pt', '--lengths=8,16', '--stride=4', f'--data_dir={data_dir}',
                   f'--out={prefix}', '--quiet=True', '--device=cpu', '--max_tokens_per_length=0',
                   '--rope_scaling=yarn', '--rope_factor=2', f'--same_docs={same_docs}', '--protocol=sliding'])
    stdout = capsys.readouterr().out

    with open(prefix + '.json') as f:
        res = json.load(f)
    assert res['lengths'] == [8, 16]
    labels = [m['label'] for m in res['models']]
    assert labels == ['tapa', 'learned', 'rope yarn x2']
    by_label = {m['label']: m['results'] for m in res['models']}
    # documents with at least L+1 tokens (L = 16 for every length with same_docs), each scoring all but
    # its first token
    for L in (8, 16):
        used = [n + 1 for n in doc_lengths if n + 1 >= (16 if same_docs else L) + 1]
        assert res['data_per_length'][str(L)]['docs'] == len(used)
        assert res['data_per_length'][str(L)]['tokens'] == sum(n - 1 for n in used)
        assert by_label['tapa'][str(L)]['tokens'] == sum(n - 1 for n in used)
    for label in ('tapa', 'rope yarn x2'):
        for L in ('8', '16'):
            r = by_label[label][L]
            assert math.isfinite(r['ppl']) and r['ppl'] == pytest.approx(math.exp(r['loss']))
    assert math.isfinite(by_label['learned']['8']['ppl'])
    assert by_label['learned']['16']['ppl'] is None and 'learned' in by_label['learned']['16']['note']
    assert res['models'][2]['model_args']['rope_scaling'] == 'yarn'

    with open(prefix + '.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    learned16 = [r for r in rows if r['label'] == 'learned' and r['length'] == '16'][0]
    assert learned16['ppl'] == 'n/a'
    tapa8 = [r for r in rows if r['label'] == 'tapa' and r['length'] == '8'][0]
    assert float(tapa8['ppl']) == pytest.approx(by_label['tapa']['8']['ppl'])

    table_row = [line for line in stdout.splitlines() if line.startswith('| learned |')][0]
    assert table_row.rstrip().endswith('| n/a |')
    assert os.path.exists(prefix + '.md')
    assert os.path.exists(prefix + '.png') == HAS_MATPLOTLIB


def test_eval_ppl_rejects_data_of_another_tokenizer(tmp_path):
    data_dir = write_split(str(tmp_path / 'data'), [np.arange(1, 30)], tokenizer='gpt2', vocab_size=50257,
                           eot=50256)
    a = save_checkpoint(tiny_gpt('tapa'), str(tmp_path / 'out'))
    with pytest.raises(SystemExit, match='tokenizer'):
        eval_ppl.main([f'--ckpt={a}', f'--data_dir={data_dir}', '--quiet=True', '--device=cpu'])


# ---------------------------------------------------------------------------
# eval_passkey.py

KEY_LINE = ' The pass key is {key}. Remember it. {key} is the pass key.'  # written out again, on purpose
QUESTION = ' What is the pass key? The pass key is'
SENTENCES = ['The grass is green.', 'The sky is blue.', 'The sun is yellow.', 'Here we go.', 'There and back again.']


def tokenizers():
    names = ['byte']
    try:
        get_tokenizer('gpt2')
        names.append('gpt2')
    except Exception:  # no tiktoken files offline: test the byte tokenizer only
        pass
    return names


@pytest.mark.parametrize('tok_name', tokenizers())
@pytest.mark.parametrize('L', [120, 333, 1000])
@pytest.mark.parametrize('depth', [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_is_L_tokens_with_the_key_at_the_asked_depth(tok_name, L, depth):
    tok = get_tokenizer(tok_name)
    key = '73914'
    p = eval_passkey.passkey_prompt(tok, L, depth, key)
    ids = p['ids']
    assert len(ids) == L
    text = tok.decode(ids)
    line = KEY_LINE.format(key=key)
    assert text.count(line) == 1 and text.endswith(QUESTION)
    # where does the key line start, in tokens? the first i from which the tokens decode to it
    key_pos = next(i for i in range(L) if tok.decode(ids[i:]).startswith(line))
    n_filler = L - len(tok.encode(line)) - len(tok.encode(QUESTION))
    sentence = max(len(tok.encode(' ' + s)) for s in SENTENCES)
    assert abs(key_pos - depth * n_filler) <= sentence
    if depth == 0.0:
        assert key_pos == 0
    if depth == 1.0:
        assert key_pos == n_filler  # right before the question
    # the rest is filler sentences, whole ones except possibly the very first
    rest = (text[:text.index(line)] + text[text.index(line) + len(line):-len(QUESTION)]).strip()
    cycle = ' '.join(SENTENCES * (L // 10 + 2))
    assert rest == '' or rest in cycle
    assert p['answer'] == tok.encode(' ' + key) and p['key_pos'] == key_pos


def test_passkey_prompt_with_data_filler_splices_at_a_sentence_end(tmp_path):
    tok = get_tokenizer('byte')
    book = ' '.join(f'Sentence number {i} is here.' for i in range(300))
    data_dir = write_split(str(tmp_path / 'data'), [tok.encode(book)])
    from data.common import load_split
    data = load_split(data_dir, 'validation')
    for depth in (0.3, 0.7):
        p = eval_passkey.passkey_prompt(tok, 500, depth, '55555', 'data', data, random.Random(1))
        assert len(p['ids']) == 500
        text = tok.decode(p['ids'])
        before = text[:text.index(KEY_LINE.format(key='55555'))]
        assert before.endswith('.') and before in book  # a piece of the book, cut after a sentence
    with pytest.raises(ValueError, match='too short'):
        eval_passkey.passkey_prompt(tok, 60, 0.5, '55555')


def test_passkey_scores_match_generate_and_a_full_forward():
    model = tiny_gpt('tapa', block_size=64, sharpen=False)
    tok = get_tokenizer('byte')
    prompts = [eval_passkey.passkey_prompt(tok, 130, d, k) for d, k in ((0.2, '12345'), (0.8, '90210'))]
    n_new = 7
    gen, ll = eval_passkey.answer_and_score(model, [p['ids'] for p in prompts], [p['answer'] for p in prompts],
                                            n_new, torch.autocast('cpu', enabled=False))
    with torch.no_grad():
        for p, g, l in zip(prompts, gen, ll):
            idx = torch.tensor([p['ids']])
            assert g == sample.generate(model, idx, n_new, temperature=0)[0, 130:].tolist()
            full = torch.tensor([p['ids'] + p['answer']])
            logits, _ = model(full, targets=torch.zeros_like(full))
            logp = F.log_softmax(logits[0].double(), dim=-1)
            expected = sum(logp[130 - 1 + j, a].item() for j, a in enumerate(p['answer']))
            assert l == pytest.approx(expected, abs=1e-4)
    assert eval_passkey.first_number(' 12345. Rem') == '12345'
    assert eval_passkey.first_number('x12345') == ''


def test_eval_passkey_end_to_end_with_learned_na(tmp_path, capsys):
    a = save_checkpoint(tiny_gpt('tapa', block_size=64, sharpen=False), str(tmp_path / 'out-tapa'))
    b = save_checkpoint(tiny_gpt('learned', block_size=128, sharpen=False), str(tmp_path / 'out-learned'))
    prefix = str(tmp_path / 'pk')
    eval_passkey.main([f'--ckpt={a},{b}', '--lengths=110,200', '--depths=0,1', '--num_trials=2', '--quiet=True',
                       '--device=cpu', f'--out={prefix}'])
    stdout = capsys.readouterr().out
    with open(prefix + '.json') as f:
        res = json.load(f)
    tapa, learned = res['models']
    for L in ('110', '200'):
        for d in ('0.0', '1.0'):
            r = tapa['results'][L][d]
            assert 0.0 <= r['accuracy'] <= 1.0 and r['loglik_per_digit'] < 0 and len(r['trials']) == 2
    # 110 + the 6 tokens fed while answering fit in 128 positions; 200 do not
    assert learned['results']['110']['0.0'] is not None
    assert learned['results']['200']['0.0'] is None and '200' in learned['notes']
    assert [t['key'] for t in tapa['results']['110']['0.0']['trials']] == \
           [t['key'] for t in learned['results']['110']['0.0']['trials']]  # the same keys for every model
    row = [line for line in stdout.splitlines() if line.startswith('| learned |')][0]
    assert row.rstrip().endswith('| n/a |')
    assert os.path.exists(prefix + '.md')


def test_sample_with_learned_embeddings_uses_all_of_block_size(tmp_path, capsys):
    """generate() feeds back every sampled token but the last: a prompt of P tokens plus N new ones
    needs P + N - 1 positions, so with block_size 16 and an 8-byte prompt 9 new tokens fit, 10 do not."""
    import sample
    from configurator import ConfigError
    out_dir = save_checkpoint(tiny_gpt('learned', block_size=16, sharpen=False), str(tmp_path / 'out'))
    args = [f'--out_dir={out_dir}', '--start=abcdefgh', '--num_samples=1', '--device=cpu', '--seed=1']
    text, = sample.main(args + ['--max_new_tokens=9'])
    assert text.startswith('abcdefgh')
    with pytest.raises(ConfigError, match=r'needs 17 positions: lower max_new_tokens to at most 9'):
        sample.main(args + ['--max_new_tokens=10'])


# ---------------------------------------------------------------------------
# bad settings: one clear error each (main turns them into an `error: ...` exit)


@pytest.fixture
def ckpt_and_data(tmp_path):
    data_dir = write_split(str(tmp_path / 'data'), [np.arange(1, 40), np.arange(1, 30)])
    return save_checkpoint(tiny_gpt('tapa'), str(tmp_path / 'out')), data_dir


@pytest.mark.parametrize('arg, message', [
    ('--max_tokens_per_length=-5', r"--max_tokens_per_length=-5 must be >= 0 \(0 = no limit\)"),
    ('--max_docs=-1', r"--max_docs=-1 must be >= 0"),  # else: eligible[:-1] drops the last document
    ('--max_factor=0', r"--max_factor=0 must be >= 1"),
    ('--batch_tokens=0', r"--batch_tokens=0 must be >= 1"),
])
def test_eval_ppl_refuses_meaningless_budgets(tmp_path, ckpt_and_data, arg, message):
    ckpt, data_dir = ckpt_and_data
    with pytest.raises(SystemExit, match=r"^error: " + message):
        eval_ppl.main([f'--ckpt={ckpt}', f'--data_dir={data_dir}', '--lengths=8', '--quiet=True', '--device=cpu',
                       f'--out={tmp_path / "ppl"}', arg])
    assert not os.path.exists(tmp_path / 'ppl.json')


def test_eval_missing_checkpoint_names_the_scripts_that_write_one(tmp_path, ckpt_and_data):
    _, data_dir = ckpt_and_data
    for script in (eval_ppl, eval_passkey):
        with pytest.raises(SystemExit, match=r"^error: no checkpoint at .*out-x-ft4x-abf.*ckpt\.pt: pass --ckpt=.*"
                                             r"train\.py or fine-tuned with finetune_long\.py"):
            script.main([f'--ckpt={tmp_path / "out-x-ft4x-abf"}', f'--data_dir={data_dir}', '--lengths=8',
                         '--quiet=True', f'--out={tmp_path / "r"}'])


def test_eval_unavailable_device_and_mismatched_weights(tmp_path, ckpt_and_data, monkeypatch):
    ckpt, data_dir = ckpt_and_data
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # the same on a machine with a GPU
    args = [f'--ckpt={ckpt}', f'--data_dir={data_dir}', '--lengths=8', '--quiet=True', f'--out={tmp_path / "r"}']
    with pytest.raises(SystemExit, match=r"^error: device='cuda', but CUDA is not available here"):
        eval_ppl.main(args + ['--device=cuda'])
    with pytest.raises(SystemExit, match=r"^error: device='gpu' is not a device name"):
        eval_passkey.main(args + ['--device=gpu'])
    # model_args that do not describe the weights (here: a TAPA model relabelled as learned)
    checkpoint = torch.load(os.path.join(ckpt, 'ckpt.pt'), weights_only=True)
    checkpoint['model_args']['pos_encoding'] = 'learned'
    torch.save(checkpoint, os.path.join(ckpt, 'ckpt.pt'))
    with pytest.raises(SystemExit, match=r"^error: .*ckpt\.pt: the checkpoint's weights do not match its "
                                         r"model_args.*missing: transformer\.wpe\.weight"):
        eval_ppl.main(args + ['--device=cpu'])


def test_eval_passkey_refuses_a_zero_batch(tmp_path, ckpt_and_data):
    ckpt, _ = ckpt_and_data
    with pytest.raises(SystemExit, match=r"^error: --batch_size=0 must be >= 1"):
        eval_passkey.main([f'--ckpt={ckpt}', '--lengths=110', '--num_trials=1', '--quiet=True', '--device=cpu',
                           '--batch_size=0', f'--out={tmp_path / "pk"}'])


def test_eval_passkey_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(tmp_path, ckpt_and_data):
    """GPT-2 ids index past a byte model's 256 embeddings (an IndexError deep in torch), and byte ids
    fed to a GPT-2 model mean other text (silently wrong scores): both are refused up front."""
    ckpt, _ = ckpt_and_data  # a byte model that records its tokenizer
    args = [f'--ckpt={ckpt}', '--lengths=110', '--num_trials=1', '--quiet=True', '--device=cpu', f'--out={tmp_path / "pk"}']
    with pytest.raises(SystemExit, match=r"^error: --tokenizer=gpt2, but .* was trained with the byte tokenizer"):
        eval_passkey.main(args + ['--tokenizer=gpt2'])
    checkpoint = torch.load(os.path.join(ckpt, 'ckpt.pt'), weights_only=True)
    del checkpoint['config']['tokenizer']  # an older checkpoint that does not record it
    torch.save(checkpoint, os.path.join(ckpt, 'ckpt.pt'))
    with pytest.raises(SystemExit, match=r"^error: --tokenizer=gpt2, but .* has only 256 token embeddings"):
        eval_passkey.main(args + ['--tokenizer=gpt2'])
    eval_passkey.main(args + ['--tokenizer=byte'])  # the right one, given by hand
    assert os.path.exists(tmp_path / 'pk.json')


@pytest.mark.parametrize('script, first_line, setting', [
    (eval_ppl, 'Long-context perplexity: how well', '  --max_factor=16\n'),
    (eval_passkey, 'Passkey retrieval: can a model fetch', '  --num_trials=5\n'),
])
@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_prints_usage_and_settings(capsys, script, first_line, setting, flag):
    with pytest.raises(SystemExit) as e:
        script.main([flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert first_line in out and 'settings and their defaults:' in out and setting in out


# ---------------------------------------------------------------------------
# the 'spans' protocol: the same spans at every length, past the front matter, with full context


def test_spans_are_past_the_skip_spread_and_dealt_in_turns():
    doc_lengths = [1000, 300, 50, 601]
    first, span = 100, 20
    spans, too_short = eval_ppl.select_spans(doc_lengths, first, span)
    assert too_short == [2]  # 50 tokens: no room after 100, reported rather than dropped
    for d in (0, 1, 3):
        starts = sorted(s for i, s in spans if i == d)
        room = (doc_lengths[d] - 1 - first) // span
        assert len(starts) == room  # no budget: every span that fits
        slot = (doc_lengths[d] - 1 - first) // room
        assert starts == [first + j * slot for j in range(room)]  # one per equal slice, none overlapping
        assert starts[-1] + span <= doc_lengths[d] - 1  # the last scored token exists
    # a budget of 5 spans, dealt to the 3 usable documents in turn: 2, 2, 1
    spans, _ = eval_ppl.select_spans(doc_lengths, first, span, max_tokens=5 * span)
    assert [[i for i, _ in spans].count(d) for d in (0, 1, 3)] == [2, 2, 1]
    spans, _ = eval_ppl.select_spans(doc_lengths, first, span, max_docs=1)
    assert {i for i, _ in spans} == {0}


class ContextCounter(torch.nn.Module):
    """A stub language model with a known loss: at every position it gives the next token (data here
    counts up by one) probability c / (c + V - 1), c = the number of tokens it has seen in its window.
    So a token's loss tells exactly how much context it was scored with."""

    def __init__(self, V=16):
        super().__init__()
        self.V = V
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def hidden(self, x):  # (B, T) -> (B, T, 2): the token and its context length
        c = torch.arange(1, x.size(1) + 1, dtype=torch.float32).expand(x.size(0), -1)
        return torch.stack((x.float(), c), dim=-1)

    def lm_head(self, h):
        logits = torch.zeros(h.size(0), self.V)
        logits[torch.arange(h.size(0)), (h[:, 0].long() + 1) % self.V] = torch.log(h[:, 1])
        return logits


def test_every_scored_token_has_the_context_the_protocol_promises():
    V, span, first = 16, 8, 64
    docs = [np.arange(n) % V for n in (200, 150)]
    spans, _ = eval_ppl.select_spans([len(d) for d in docs], first, span)
    model = ContextCounter(V)
    scored = None
    for L in (16, 32, 64):
        jobs = eval_ppl.span_windows(spans, L, span)
        assert all(e - s == L and e - f == span for _, (s, e, f) in jobs)
        targets = sorted((d, f + 1 + j) for d, (s, e, f) in jobs for j in range(span))
        assert scored is None or targets == scored  # the same tokens at every length
        scored = targets
        r = eval_ppl.score_windows(model, docs, jobs, batch_size=3)
        # by hand: the j-th scored token of a span was seen with L - span + 1 + j tokens of context
        per_span = sum(-math.log(c / (c + V - 1)) for c in range(L - span + 1, L + 1))
        for d in range(len(docs)):
            n = sum(1 for i, _ in spans if i == d)
            assert r['tokens'][d] == n * span
            assert r['nll'][d] == pytest.approx(n * per_span, rel=1e-6)


def test_eval_ppl_spans_report_intervals_ratios_differences_and_short_documents(tmp_path, capsys):
    rng = np.random.default_rng(5)
    doc_lengths = [400, 300, 20, 250]  # the third cannot hold a span after skip + the longest length
    data_dir = write_split(str(tmp_path / 'data'), [rng.integers(1, 256, n) for n in doc_lengths])
    a = save_checkpoint(tiny_gpt('tapa'), str(tmp_path / 'out-a'))
    b = save_checkpoint(tiny_gpt('tapa'), str(tmp_path / 'out-b'))  # the same model twice
    prefix = str(tmp_path / 'results' / 'ppl')
    eval_ppl.main([f'--ckpt={a},{b}', '--labels=a,b', '--lengths=8,16,32', '--skip=40', f'--data_dir={data_dir}',
                   f'--out={prefix}', '--quiet=True', '--device=cpu', '--max_tokens_per_length=0',
                   '--bootstrap=200'])
    out = capsys.readouterr().out
    with open(prefix + '.json') as f:
        res = json.load(f)
    assert res['protocol'] == 'spans' and res['span'] == 2 and res['skip'] == 40
    assert res['documents'] == 3 and res['too_short'] == 1 and res['too_short_tokens'] == 21
    assert '1 too short for the longest length' in out and 'understate the variance' in out
    tokens = {res['data_per_length'][str(L)]['tokens'] for L in (8, 16, 32)}
    assert len(tokens) == 1  # the same scored tokens at every length
    for m in res['models']:
        for L in ('8', '16', '32'):
            r = m['results'][L]
            assert r['ci'][0] <= r['ppl'] <= r['ci'][1]
            assert r['ratio_ci'][0] <= r['ratio'] <= r['ratio_ci'][1]
        assert m['results']['8']['ratio'] == 1.0 and m['results']['8']['ratio_ci'] == [1.0, 1.0]
    assert res['doc_ids'] == [0, 1, 3]  # the split's documents that hold spans, in order
    for m in res['models']:  # the sums per document, from which the perplexity is computed
        for L in ('8', '16', '32'):
            r = m['results'][L]
            assert len(r['doc_nll']) == len(r['doc_tokens']) == 3 and min(r['doc_tokens']) > 0
            assert sum(r['doc_tokens']) == r['tokens'] == res['data_per_length'][L]['tokens']
            assert math.exp(sum(r['doc_nll']) / sum(r['doc_tokens'])) == pytest.approx(r['ppl'], rel=1e-12)
    for d in res['differences']:  # identical models on identical documents: exactly no difference
        assert d['a'] == 'a' and d['b'] == 'b' and d['diff'] == 0.0 and d['ci'] == [0.0, 0.0]
    with open(prefix + '.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(float(r['ppl_lo']) <= float(r['ppl']) <= float(r['ppl_hi']) for r in rows)
    assert os.path.exists(prefix + '.differences.csv')


def test_spans_budget_below_one_span_and_skip_outside_pg19(tmp_path):
    rng = np.random.default_rng(0)
    data_dir = write_split(str(tmp_path / 'data'), [rng.integers(1, 256, 300) for _ in range(3)])
    a = save_checkpoint(tiny_gpt('tapa'), str(tmp_path / 'out'))
    base = [f'--ckpt={a}', f'--data_dir={data_dir}', '--lengths=8,16', '--quiet=True', '--device=cpu',
            f'--out={tmp_path}/ppl']
    with pytest.raises(SystemExit, match=r'--max_tokens_per_length=1 is less than one span of 2 tokens'):
        eval_ppl.main(base + ['--max_tokens_per_length=1'])
    eval_ppl.main(base + ['--bootstrap=0'])
    with open(f'{tmp_path}/ppl.json') as f:
        res = json.load(f)
    assert res['skip'] == 0 and res['documents'] == 3  # 'toy' data: no front matter to skip (pg19 only)
