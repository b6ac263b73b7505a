"""The engine never silently bypasses the reference: fast_attention.py runs a fast path only while
model.py's reference functions are the code it was checked against, and otherwise runs the
reference (in query blocks without gradients) and says so."""
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast_attention  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_checks():
    """Each test sees the engine as a new process would (no remembered check)."""
    fast_attention._checked.clear()
    yield
    fast_attention._checked.clear()


def tiny(**kw):
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=61, bias=False)
    return GPTConfig(**{**cfg, **kw})


def test_recorded_fingerprints_are_current():
    """Fails when a reference function in model.py changed without the fast paths being re-checked
    against it. To fix: make the fast path compute what the new reference computes (test_model.py,
    test_tapa_triton.py compare them), then paste the output of `python fast_attention.py`."""
    for name, functions in fast_attention.REFERENCES.items():
        for f in functions:
            assert fast_attention.fingerprint(getattr(model, f)) == fast_attention.FINGERPRINTS[f], (
                f"model.{f} changed since the fast path for model.{name} was checked against it")
        assert fast_attention.changed_functions(name) == ()


def write_module(tmp_path, name, text):
    (tmp_path / f'{name}.py').write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))


def test_fingerprint_ignores_comments_and_docstrings_but_not_code(tmp_path):
    base = 'def f(x, y):\n    """Doc."""\n    return x * y  # product\n'
    same = 'def f(x, y):\n    """Another\n    docstring."""\n    # a new comment\n\n    return x * y\n'
    edit = 'def f(x, y):\n    """Doc."""\n    return x * y + 1  # product\n'
    a, b, c = (write_module(tmp_path, f'fp_{n}', text) for n, text in (('a', base), ('b', same), ('c', edit)))
    assert fast_attention.fingerprint(a.f) == fast_attention.fingerprint(b.f)
    assert fast_attention.fingerprint(a.f) != fast_attention.fingerprint(c.f)
    assert fast_attention.fingerprint(len) is None  # no source: never taken for the checked code


def scores_without_cos(q, k, weight, d_amp, phase):
    """A student's edit of Eq. 12: the amplitude alone, no phase (the cos is gone)."""
    _, amplitude, angle = REAL_SCORES(q, k, weight, d_amp, phase)
    return amplitude, amplitude, angle


REAL_SCORES = model.tapa_scores


def train_steps(T, steps=3, attn_impl='auto'):
    """Losses of a few AdamW steps of a tiny TAPA model at context T, on the CPU."""
    torch.manual_seed(0)
    gpt = GPT(tiny(block_size=T, attn_impl=attn_impl))
    with torch.no_grad():  # larger q, k than at init, so the phase matters to the loss
        for block in gpt.transformer.h:
            block.attn.c_attn.weight.mul_(8)
    opt = train.configure_optimizers(gpt, 0.0, 1e-2, (0.9, 0.95), 'cpu')
    data = torch.randint(0, 61, (2, T + 1), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        _, loss = gpt(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('T', [256, 1024])
def test_an_edited_reference_changes_training_and_is_announced(T, monkeypatch, capsys):
    calls = []
    real_apply = fast_attention.ChunkedTAPA.apply
    monkeypatch.setattr(fast_attention.ChunkedTAPA, 'apply', lambda *a: calls.append(1) or real_apply(*a))
    before = train_steps(T)
    assert calls, "at this length the unedited model runs the chunked path"
    assert 'notice' not in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(model, 'tapa_scores', scores_without_cos)
    edited = train_steps(T)
    assert not calls, "the chunked path must not run once the reference it reproduces was edited"
    assert max(abs(a - b) for a, b in zip(before, edited)) > 1e-3, (before, edited)
    err = capsys.readouterr().err
    assert err.count('notice: model.tapa_scores differs') == 1, err  # once, not per call
    # what ran is exactly the edited reference: the same losses as attn_impl='naive' with the edit
    assert train_steps(T, attn_impl='naive') == pytest.approx(edited, abs=1e-6)


def test_edited_reference_runs_in_query_blocks_without_gradients(monkeypatch):
    """In evaluation the edited reference runs a block of queries at a time (memory block x T, not
    T x T), and gives what the whole reference gives."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    seen = []

    def edited(q, k, v, alpha, theta, phase='quadratic'):
        seen.append(q.size(-2))
        return REAL_ATTENTION(q, k, v, alpha * 2, theta, phase)
    monkeypatch.setattr(model, 'tapa_attention', edited)
    impl = fast_attention.implementation(model.tapa_attention, tiny())
    with torch.no_grad():
        out = impl(q, k, v, 0.1, 0.5, 'quadratic')
    assert max(seen) <= 128 and sum(seen) == 300
    torch.testing.assert_close(out, REAL_ATTENTION(q, k, v, 0.2, 0.5), rtol=1e-5, atol=1e-6)
    # with gradients: the whole reference at once (training at the trained length)
    seen.clear()
    q.requires_grad_(True)
    impl(q, k, v, 0.1, 0.5, 'quadratic').sum().backward()
    assert seen == [300] and q.grad is not None


REAL_ATTENTION = model.tapa_attention


def test_edited_dot_product_attention_replaces_sdpa(monkeypatch, capsys):
    """The same rule for the other fast path: SDPA steps aside for an edited dot_product_attention,
    with an ALiBi bias cut into query blocks as well."""
    torch.manual_seed(0)
    gpt = GPT(tiny(pos_encoding='alibi')).eval()
    idx = torch.randint(0, 61, (1, 200))
    with torch.no_grad():
        before = gpt(idx, targets=idx)[0]
        real = model.dot_product_attention
        monkeypatch.setattr(model, 'dot_product_attention',
                            lambda q, k, v, bias=None: real(q, k, v, lambda Tq, Tk: 3 * bias(Tq, Tk)))
        edited = gpt(idx, targets=idx)[0]
        gpt.config.attn_impl = 'naive'
        naive = gpt(idx, targets=idx)[0]
    assert (edited - before).abs().max() > 1e-3
    torch.testing.assert_close(edited, naive, rtol=1e-5, atol=1e-5)
    assert 'notice: model.dot_product_attention differs' in capsys.readouterr().err


def test_a_function_without_a_fast_path_runs_as_it_is():
    def my_attention(q, k, v):
        return v
    assert fast_attention.implementation(my_attention, tiny()) is my_attention
    assert model.fast(model.tapa_attention, tiny(attn_impl='naive')) is model.tapa_attention


def test_startup_line_names_the_implementation(monkeypatch):
    cpu = torch.device('cpu')
    line = fast_attention.describe(GPT(tiny()), cpu)
    assert line.startswith('attention: tapa = reference up to 128x128 scores, chunked beyond (exact')
    assert 'chunked (exact' in fast_attention.describe(GPT(tiny(attn_impl='chunked')), cpu)
    assert "attn_impl='naive'" in fast_attention.describe(GPT(tiny(attn_impl='naive')), cpu)
    for pe in ('rope', 'alibi', 'nope', 'learned'):
        assert fast_attention.describe(GPT(tiny(pos_encoding=pe)), cpu) == \
            f'attention: {pe} = PyTorch SDPA (exact; reference model.dot_product_attention)'
    monkeypatch.setattr(model, 'tapa_scores', scores_without_cos)
    assert 'model.tapa_scores edited' in fast_attention.describe(GPT(tiny()), cpu)


def test_dispatch_traces_under_torch_compile():
    """train.py compiles the model on GPUs: the check must not break the graph once done."""
    for pe in ('tapa', 'rope'):
        torch.manual_seed(0)
        gpt = GPT(tiny(pos_encoding=pe))
        fast_attention.describe(gpt, torch.device('cpu'))  # as every script does at start-up
        compiled = torch.compile(gpt, backend='eager', fullgraph=True)
        idx = torch.randint(0, 61, (2, 40))
        torch.testing.assert_close(compiled(idx, targets=idx)[1], gpt(idx, targets=idx)[1])


def test_an_edited_mask_is_never_cut_into_query_blocks(monkeypatch, capsys):
    """Query blocks rely on causality: with the mask edited (here: one key ahead visible), evaluation
    runs the whole reference, or blocks would silently compute something else than training does."""
    real_mask = model.causal_mask

    def one_ahead(Tq, Tk, device):
        return real_mask(Tq, Tk + 1, device)[:, 1:]
    monkeypatch.setattr(model, 'causal_mask', one_ahead)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    with torch.no_grad():
        got = fast_attention.implementation(model.tapa_attention, tiny())(q, k, v, 0.1, 0.5, 'quadratic')
        torch.testing.assert_close(got, model.tapa_attention(q, k, v, 0.1, 0.5), rtol=0, atol=0)
    assert 'model.causal_mask differs' in capsys.readouterr().err


def test_autocast_off_is_part_of_what_tapa_reproduces():
    assert 'autocast_off' in fast_attention.REFERENCES['tapa_attention']


@pytest.mark.parametrize('pe', ['alibi', 't5', 'kerple', 'fire'])
def test_additive_biases_are_made_a_block_of_queries_at_a_time(pe, monkeypatch):
    """SDPA takes a bias whole: the engine asks the encoding for it a block of queries at a time,
    each against the keys up to its last query, so it never holds an (H, T, T) bias; the result and
    the gradients of the encoding's own parameters are those of the reference."""
    import functools
    T, max_bias = 200, 2 * 200 * 16  # 16 queries per block for 2 heads
    monkeypatch.setattr(fast_attention, 'sdpa_attention', functools.partial(fast_attention.sdpa_attention,
                                                                              max_bias=max_bias))
    asked = []
    real_distance = model.distance
    def distance(Tq, Tk, device):  # every bias asks for the distances of the (Tq, Tk) it makes
        asked.append(Tq * Tk)
        return real_distance(Tq, Tk, device)
    monkeypatch.setattr(model, 'distance', distance)
    idx = torch.randint(0, 61, (1, T), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ('auto', 'naive'):
        torch.manual_seed(0)
        gpt = GPT(tiny(pos_encoding=pe, attn_impl=impl))
        asked.clear()
        _, loss = gpt(idx, targets=idx)
        loss.backward()
        results[impl] = (loss.item(), [p.grad.clone() for p in gpt.parameters()], max(asked))
    assert results['auto'][2] * 2 <= max_bias < results['naive'][2] * 2  # blocks, where the reference is whole
    assert results['auto'][0] == pytest.approx(results['naive'][0], abs=1e-5)
    for a, b in zip(results['auto'][1], results['naive'][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cope_evaluates_a_block_of_queries_at_a_time_exactly(monkeypatch):
    """CoPE's positions for a query count only its own keys, so without gradients the engine runs the
    reference a block of queries at a time ((block x T) scores, not (T x T)), with the same result; with
    gradients (training) the reference runs whole."""
    T, sizes = 300, []
    real = model.cope_attention
    def cope_attention(q, k, v, pos_emb):  # the sizes of the score matrices the reference is asked for
        sizes.append(q.size(-2) * k.size(-2))
        return real(q, k, v, pos_emb)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
    pos_emb = torch.randn(16, 64)
    whole = real(q, k, v, pos_emb)
    blocked = fast_attention.implementation(model.cope_attention, tiny(pos_encoding='cope'))
    monkeypatch.setattr(model, 'cope_attention', cope_attention)
    with torch.no_grad():
        got = blocked.func(cope_attention, q, k, v, pos_emb, **blocked.keywords)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
    assert max(sizes) <= 128 * T < T * T
