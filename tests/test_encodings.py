"""The encodings of a course beyond the first five, each checked against its paper's formula written
out here one element or one (query, key) pair at a time: sinusoidal (Vaswani et al. 2017), T5's
bucketed bias (Raffel et al. 2020), Kerple's log bias (Chi et al. 2022), FIRE (Li et al. 2023), xPos
(Sun et al. 2022), CoPE (Golovneva et al. 2024).
Causality and KV cache == full forward are checked for every encoding in test_model.py."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from model import GPT, GPTConfig, Positions  # noqa: E402

torch.set_num_threads(1)


def cfg(**kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=61), **kw})


def positions(Tq, Tk, tables=None):
    return Positions(q=torch.arange(Tk - Tq, Tk), k=torch.arange(Tk), tables=tables)


def attention_loop(q, k, v, score):
    """softmax over the visible keys of score(b, h, m, n, q_m, k_n), @ v, for queries at the last Tq
    positions, one pair at a time in Python floats."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                m = Tk - Tq + i
                s = [score(h, m, n, q[b, h, i].tolist(), k[b, h, n].tolist()) for n in range(m + 1)]
                w = [math.exp(x - max(s)) for x in s]
                for n in range(m + 1):
                    out[b, h, i] += w[n] / sum(w) * v[b, h, n].double()
    return out


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_sinusoidal_is_vaswanis_table():
    c, T = cfg(pos_encoding='sinusoidal'), 50
    pe = model.sinusoidal_embedding(None, positions(T, T), c)
    d = c.n_embd
    for pos in range(T):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(0.02 * math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(0.02 * math.cos(angle), abs=1e-6)
    far = model.sinusoidal_embedding(None, Positions(q=torch.tensor([10 ** 6]), k=torch.arange(1)), c)
    assert torch.isfinite(far).all()  # computed at any position: nothing to run out of


def t5_bucket_reference(distance, num_buckets=32, max_distance=128):
    """Mesh TensorFlow's _relative_position_bucket with bidirectional=False, for distance = m - n >= 0."""
    max_exact = num_buckets // 2
    if distance < max_exact:
        return distance
    large = max_exact + int(math.log(distance / max_exact) / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact))
    return min(large, num_buckets - 1)


def test_t5_buckets_follow_the_t5_rule():
    distances = [0, 1, 7, 15, 16, 17, 20, 31, 32, 33, 50, 64, 90, 100, 127, 128, 129, 500, 10 ** 5]
    got = model.t5_bucket(torch.tensor(distances)).tolist()
    assert got == [t5_bucket_reference(d) for d in distances]
    assert got[distances.index(15)] == 15 and got[distances.index(128)] == 31 == got[-1]  # the last is shared


def test_t5_bias_is_a_learned_bias_per_head_and_bucket_shared_by_the_layers():
    torch.manual_seed(0)
    gpt = GPT(cfg(pos_encoding='t5'))
    table = gpt.transformer.wpe  # (32 buckets, 2 heads), one for all layers
    with torch.no_grad():
        table.weight.normal_(0, 1.0)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (4, 6, 6))  # queries: the last 4
    got = model.attend_t5(q, k, v, positions(4, 6), table, cfg(pos_encoding='t5', attn_impl='naive'))
    W = table.weight.double()
    ref = attention_loop(q, k, v, lambda h, m, n, qm, kn: dot(qm, kn) / math.sqrt(8)
                         + W[t5_bucket_reference(m - n), h].item())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    assert sum(p.numel() for p in gpt.parameters()) - sum(p.numel() for p in GPT(cfg()).parameters()) == 32 * 2


def test_kerple_is_minus_r1_log_of_one_plus_r2_distance():
    torch.manual_seed(0)
    params = model.KerpleParams(cfg())
    r1, r2 = (torch.nn.functional.softplus(p).tolist() for p in (params.raw_r1, params.raw_r2))
    assert all(0.01 <= r <= 2.0 + 1e-6 for r in r1) and all(0.01 <= r <= 1.0 + 1e-6 for r in r2)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (5, 7, 7))  # queries: the last 5
    ref = attention_loop(q, k, v, lambda h, m, n, qm, kn: dot(qm, kn) / math.sqrt(8)
                         - r1[h] * math.log(1 + r2[h] * (m - n)))
    for impl in ('naive', 'auto'):
        got = model.attend_kerple(q, k, v, positions(5, 7), params, cfg(attn_impl=impl))
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_xpos_is_rope_times_its_decay():
    D, base, Tq, Tk = 8, 10000.0, 4, 9
    c = cfg(pos_encoding='xpos', n_embd=16, n_head=2, attn_impl='naive')
    tables = model.rope_cos_sin(c, D, Tk, 'cpu')
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, D) for n in (Tq, Tk, Tk))
    got = model.attend_xpos(q, k, v, positions(Tq, Tk, tables), None, c)

    def score(h, m, n, qm, kn):  # pair i rotated by pos * theta_i, scaled by zeta_i^(+-pos / 512)
        total = 0.0
        for i in range(D // 2):
            theta, zeta = base ** (-2 * i / D), (2 * i / D + 0.4) / 1.4
            a, b = qm[2 * i], qm[2 * i + 1]
            c_, d = kn[2 * i], kn[2 * i + 1]
            cm, sm, cn, sn = math.cos(m * theta), math.sin(m * theta), math.cos(n * theta), math.sin(n * theta)
            qa, qb = a * cm - b * sm, a * sm + b * cm
            ka, kb = c_ * cn - d * sn, c_ * sn + d * cn
            total += (qa * ka + qb * kb) * zeta ** ((m - n) / 512)
        return total / math.sqrt(D)
    torch.testing.assert_close(got.double(), attention_loop(q, k, v, score), rtol=1e-5, atol=1e-6)


def test_xpos_decay_stays_finite_far_past_training_and_refuses_float16_where_it_would_not():
    c = cfg(pos_encoding='xpos')
    T = 40000
    tables = model.rope_cos_sin(c, 8, T, 'cpu')
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    out = model.attend_xpos(q, k, v, positions(1, T, tables), None, c)  # float32: centred, no overflow
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match='float16'):
        model.attend_xpos(q.half(), k.half(), v.half(), positions(1, T, tables), None, c)


@pytest.mark.parametrize('pe,names', [('t5', ['transformer.wpe.weight']),
                                      ('kerple', ['transformer.h.0.attn.pe.raw_r1', 'transformer.h.1.attn.pe.raw_r2']),
                                      ('fire', ['transformer.h.0.attn.pe.mlp.0.weight', 'transformer.h.1.attn.pe.mlp.2.weight',
                                                'transformer.h.0.attn.pe.c', 'transformer.h.1.attn.pe.L_multiplier']),
                                      ('cope', ['transformer.h.0.attn.pe.pos_emb', 'transformer.h.1.attn.pe.pos_emb'])])
def test_gradients_reach_each_encodings_own_parameters(pe, names):
    torch.manual_seed(0)
    gpt = GPT(cfg(pos_encoding=pe))
    idx = torch.randint(0, 61, (2, 12))
    gpt(idx, targets=idx)[1].backward()
    grads = dict(gpt.named_parameters())
    for name in names:
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name


def mlp_loop(params, u):
    """FIRE's f: Linear(1, 32), ReLU, Linear(32, H), one input at a time in Python floats."""
    w1, b1 = params.mlp[0].weight[:, 0].tolist(), params.mlp[0].bias.tolist()
    w2, b2 = params.mlp[2].weight.tolist(), params.mlp[2].bias.tolist()
    hidden = [max(0.0, w * u + b) for w, b in zip(w1, b1)]
    return [dot(row, hidden) + b for row, b in zip(w2, b2)]


@pytest.mark.parametrize('Tq,Tk,threshold', [(5, 7, 3.0), (1, 40, 3.0), (6, 6, 0.0)])
def test_fire_is_an_mlp_of_the_log_distance_over_the_log_query_position(Tq, Tk, threshold):
    """b(m, n) = f(psi(m - n) / psi(max(L, m))), psi(x) = log(1 + c x), m the query's absolute position
    (a KV cache's last query included), L = |multiplier * L0|."""
    torch.manual_seed(0)
    c_ = cfg(pos_encoding='fire', fire_threshold=threshold)
    params = model.FIREParams(c_)
    with torch.no_grad():  # away from the initial values, so that a term left out shows
        for p in params.mlp.parameters():
            p.normal_()
        params.c.fill_(0.7)
        params.L_multiplier.fill_(-1.5)  # L is |multiplier * L0|
    L = 1.5 * (threshold or c_.block_size / 4)
    psi = lambda x: math.log(1 + 0.7 * x)  # noqa: E731
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (Tq, Tk, Tk))
    ref = attention_loop(q, k, v, lambda h, m, n, qm, kn: dot(qm, kn) / math.sqrt(8)
                         + mlp_loop(params, psi(m - n) / psi(max(L, m)))[h])
    for impl in ('naive', 'auto'):
        got = model.attend_fire(q, k, v, positions(Tq, Tk), params, cfg(attn_impl=impl))
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_fire_threshold_defaults_to_a_quarter_of_the_training_context_and_survives_a_longer_one():
    gpt = GPT(cfg(pos_encoding='fire', block_size=64))
    assert gpt.transformer.h[0].attn.pe.L0 == 16
    from finetune_long import change_context
    change_context(gpt, 256)
    assert gpt.config.fire_threshold == 16 and GPT(gpt.config).transformer.h[0].attn.pe.L0 == 16


@pytest.mark.parametrize('Tq,Tk,npos', [(5, 9, 16), (9, 9, 4)])
def test_cope_positions_count_the_gates_from_the_key_to_the_query(Tq, Tk, npos):
    """Eqs. 3-5 with the authors' scaled gate: g_mt = sigmoid(q_m.k_t / sqrt(D)), p_mn = sum_{t=n..m} g_mt
    (clamped to the last of npos embeddings), score = q_m.k_n / sqrt(D) + q_m.e[p_mn] with e
    interpolated linearly between the integers around p."""
    torch.manual_seed(0)
    D = 8
    q, k, v = (torch.randn(1, 2, n, D, dtype=torch.float64) * 2 for n in (Tq, Tk, Tk))
    e = torch.randn(D, npos, dtype=torch.float64)

    def score(h, m, n, qm, kn):
        i = m - (Tk - Tq)  # the query's row
        gate = lambda t: 1 / (1 + math.exp(-dot(qm, k[0, h, t].tolist()) / math.sqrt(D)))  # noqa: E731
        p = min(sum(gate(t) for t in range(n, m + 1)), npos - 1)
        lo, hi = math.floor(p), math.ceil(p)
        qe = lambda j: dot(q[0, h, i].tolist(), e[:, j].tolist())  # noqa: E731
        return dot(qm, kn) / math.sqrt(D) + (p - lo) * qe(hi) + (1 - (p - lo)) * qe(lo)
    ref = attention_loop(q, k, v, score)
    params = torch.nn.Module()
    params.pos_emb = torch.nn.Parameter(e)
    for impl in ('naive', 'auto'):
        got = model.attend_cope(q, k, v, positions(Tq, Tk), params, cfg(attn_impl=impl))
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
