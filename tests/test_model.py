"""Checks of model.py against independent computations: per-pair loops of the paper's equations,
published formulas recomputed here in plain Python, and invariances that must hold."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from finetune_long import change_context  # noqa: E402
import train  # noqa: E402
from fast_attention import tapa_attention  # noqa: E402  (impl='naive' is model.tapa_attention)
from model import GPT, GPTConfig, alibi_slopes, apply_rope, rope_frequencies  # noqa: E402

torch.set_num_threads(1)

PES = ['tapa', 'rope', 'alibi', 'nope', 'learned', 'sinusoidal', 't5', 'kerple', 'fire', 'xpos', 'cope']


def tiny_config(**kw):
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=61, dropout=0.0, bias=False)
    cfg.update(kw)
    return GPTConfig(**cfg)


# ---------------------------------------------------------------------------
# TAPA against a per-pair loop of Eq. 12


def tapa_loop(q, k, v, alpha, theta, phase):
    """Eq. 12 one (query, key) pair at a time, in plain Python floats."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dA = round(theta * D)
    dP = D - dA
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                m = Tk - Tq + i
                scores = []
                for n in range(m + 1):
                    qa, ka = q[b, h, i, :dA].tolist(), k[b, h, n, :dA].tolist()
                    qp, kp = q[b, h, i, dA:].tolist(), k[b, h, n, dA:].tolist()
                    amp = sum(x * y for x, y in zip(qa, ka)) / math.sqrt(dA)
                    if phase == 'quadratic':
                        phi = sum(x * y for x, y in zip(qp, kp)) / math.sqrt(dP)
                    else:
                        phi = (sum(qp) + sum(kp)) / math.sqrt(dP)
                    scores.append(amp * math.cos(2 * math.pi * abs(m - n) ** alpha * phi))
                mx = max(scores)
                w = [math.exp(s - mx) for s in scores]
                z = sum(w)
                for n in range(m + 1):
                    out[b, h, i] += (w[n] / z) * v[b, h, n].double()
    return out


@pytest.mark.parametrize('phase', ['quadratic', 'linear'])
@pytest.mark.parametrize('impl', ['naive', 'chunked'])
@pytest.mark.parametrize('Tq,Tk,theta,alpha', [(7, 7, 0.5, 0.1), (3, 9, 0.25, 0.5), (1, 6, 0.75, 1.0)])
def test_tapa_matches_per_pair_loop(phase, impl, Tq, Tk, theta, alpha):
    g = torch.Generator().manual_seed(1)
    D = 8
    q, k, v = (torch.randn(1, 2, T, D, generator=g) for T in (Tq, Tk, Tk))
    out = tapa_attention(q, k, v, alpha, theta, phase, impl=impl, chunk_size=4)
    ref = tapa_loop(q, k, v, alpha, theta, phase)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_linear_and_quadratic_phase_differ_and_agree_where_they_should():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 6, 8, generator=g) for _ in range(3))
    quad = tapa_attention(q, k, v, 0.1, 0.5, 'quadratic')
    lin = tapa_attention(q, k, v, 0.1, 0.5, 'linear')
    assert (quad - lin).abs().max() > 1e-3  # different functions
    # with a zero phase part both reduce to NoPE on the amplitude dims: softmax(q_A.k_A/sqrt(dA))
    q0, k0 = q.clone(), k.clone()
    q0[..., 4:] = 0
    k0[..., 4:] = 0
    att = (q0[..., :4] @ k0[..., :4].transpose(-1, -2)) / 2.0
    att = att.masked_fill(torch.ones(6, 6).triu(1).bool(), float('-inf'))
    nope = torch.softmax(att, -1) @ v
    for phase in ('quadratic', 'linear'):
        torch.testing.assert_close(tapa_attention(q0, k0, v, 0.1, 0.5, phase), nope, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# chunked == naive, values and gradients


@pytest.mark.parametrize('phase', ['quadratic', 'linear'])
@pytest.mark.parametrize('Tq,Tk,chunk', [(37, 37, 8), (11, 45, 16), (1, 23, 5), (64, 64, 64), (30, 30, 7)])
def test_chunked_equals_naive_values_and_grads(phase, Tq, Tk, chunk):
    g = torch.Generator().manual_seed(Tq * 100 + Tk)
    q, k, v = (torch.randn(2, 3, T, 16, generator=g, requires_grad=True) for T in (Tq, Tk, Tk))
    grad = torch.randn(2, 3, Tq, 16, generator=g)
    outs, grads = [], []
    for impl in ('naive', 'chunked'):
        out = tapa_attention(q, k, v, 0.1, 0.5, phase, impl=impl, chunk_size=chunk)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for name, gc, gn in zip('qkv', grads[1], grads[0]):
        torch.testing.assert_close(gc, gn, rtol=1e-4, atol=1e-4, msg=lambda m: f'd{name}: {m}')


@pytest.mark.parametrize('phase', ['quadratic', 'linear'])
def test_chunked_backward_passes_gradcheck(phase):
    """Finite differences, independent of any hand-derived chain rule."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for T in (5, 7, 7))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tapa_attention(q, k, v, 0.3, 0.5, phase, impl='chunked', chunk_size=3), (q, k, v))


@pytest.mark.parametrize('impl', ['naive', 'chunked'])
def test_bfloat16_inputs_get_a_float32_phase(impl):
    """With bfloat16 q, k (autocast on a GPU; decoding with a KV cache runs the naive path), both
    paths must form q_P.k_P and the angle in float32: phases of hundreds of radians, rounded to
    bfloat16's 8 bits, would be off by a radian. Reference: float64 on the same bfloat16 values."""
    g = torch.Generator().manual_seed(7)
    q, k, v = ((3 * torch.randn(1, 2, 128, 64, generator=g)).bfloat16() for _ in range(3))
    ref = tapa_attention(q.double(), k.double(), v.double(), 0.1, 0.5, impl='naive')
    out = tapa_attention(q, k, v, 0.1, 0.5, impl=impl, **({'chunk_size': 32} if impl == 'chunked' else {}))
    assert out.dtype == torch.bfloat16
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err  # bfloat16's rounding of the output: ~4e-3


@pytest.mark.parametrize('impl', ['naive', 'chunked'])
def test_tapa_runs_where_torch_has_no_autocast_for_the_device(monkeypatch, impl):
    """TAPA turns autocast off around its float32 angle; a torch without autocast for the device
    (MPS before torch 2.5) refuses to build even a disabled autocast: there is nothing to turn off."""
    def no_autocast(device_type, *args, **kwargs):
        raise RuntimeError(f"User specified an unsupported autocast device_type '{device_type}'")
    monkeypatch.setattr(torch, 'autocast', no_autocast)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    out = tapa_attention(q, k, v, 0.1, 0.5, impl=impl, **({'chunk_size': 16} if impl == 'chunked' else {}))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_chunked_tapa_refuses_a_second_derivative():
    """Its backward is hand-written and not differentiable: create_graph=True (a gradient penalty, say)
    gets a clear error rather than a second-order term silently missing."""
    q, k, v = (torch.randn(1, 1, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = tapa_attention(q, k, v, 0.1, 0.5, impl='chunked', chunk_size=8)
    with pytest.raises(RuntimeError, match='no second derivative'):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    g, = torch.autograd.grad(tapa_attention(q, k, v, 0.1, 0.5, impl='naive').sum(), q, create_graph=True)
    assert g.requires_grad  # the naive path, plain autograd, has one


def test_rope_cache_made_under_inference_mode_serves_training():
    model = GPT(tiny_config(pos_encoding='rope'))
    idx = torch.randint(0, 61, (1, 20))
    with torch.inference_mode():  # as sample.py and the evaluations run it
        model(idx)
    _, loss = model(idx, targets=idx)
    loss.backward()  # saving an inference-mode cos/sin for backward would raise here
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_chunked_tapa_works_in_bfloat16():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    ref = tapa_attention(q, k, v, 0.1, 0.5, impl='naive')
    out = tapa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.1, 0.5, impl='chunked', chunk_size=16)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize('kw', [dict(attn_impl='naive'), dict(attn_impl='chunked'),
                                dict(attn_impl='chunked', tapa_phase_scale=0.05),
                                dict(attn_impl='naive', tapa_phase='linear', tapa_phase_scale=0.05)],
                         ids=lambda kw: '-'.join(str(v) for v in kw.values()))
def test_tapa_model_trains_under_bfloat16_autocast(kw, monkeypatch):
    """train.py runs the model under autocast on a GPU (bfloat16 or float16). q, k, v must reach the
    attention in one dtype (the fused kernel refuses a mix), and each path must give float32's loss
    and gradients up to bfloat16's rounding. (The CPU autocast stands in for the GPU's here.)"""
    import fast_attention
    import model as model_module
    seen = []
    # the reference (naive) or the engine's dispatch (chunked): spying on the reference would make the
    # engine see an edited reference and run it instead of the chunked path
    module = model_module if kw['attn_impl'] == 'naive' else fast_attention
    real = module.tapa_attention
    monkeypatch.setattr(module, 'tapa_attention', lambda q, k, v, *a, **kw: seen.append((q.dtype, k.dtype, v.dtype))
                        or real(q, k, v, *a, **kw))
    torch.manual_seed(0)
    gpt = GPT(tiny_config(pos_encoding='tapa', block_size=64, **kw))
    if kw.get('tapa_phase_scale'):
        gpt.set_tapa_phase_ramp(1.0)  # q (and k for 'linear') are rescaled before the attention
    idx = torch.randint(0, 61, (2, 40))  # 40 x 40 scores: above 'auto's naive size, so chunked runs chunked
    weight = gpt.transformer.h[0].attn.c_attn.weight
    _, loss32 = gpt(idx, targets=idx)
    grad32, = torch.autograd.grad(loss32, weight)
    seen.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss16 = gpt(idx, targets=idx)
    grad16, = torch.autograd.grad(loss16, weight)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
    assert abs(loss16.item() - loss32.item()) < 1e-2 * loss32.item()
    assert ((grad16 - grad32).norm() / grad32.norm()).item() < 3e-2


# ---------------------------------------------------------------------------
# invalid TAPA settings


@pytest.mark.parametrize('theta', [0.0, 1.0, 0.3, -0.5, 1.5])
def test_bad_theta_is_rejected(theta):
    with pytest.raises(ValueError, match='tapa_theta'):
        GPT(tiny_config(tapa_theta=theta))  # head dim 16: theta*16 must be a whole number in 1..15


@pytest.mark.parametrize('alpha', [0.0, -0.1, float('nan'), float('inf')])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match='tapa_alpha'):
        GPT(tiny_config(tapa_alpha=alpha))


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match='pos_encoding'):
        GPT(tiny_config(pos_encoding='sinusodial'))
    with pytest.raises(ValueError, match='tapa_phase'):
        GPT(tiny_config(tapa_phase='cubic'))
    with pytest.raises(ValueError, match='rope_scaling'):
        GPT(tiny_config(pos_encoding='rope', rope_scaling='longrope'))
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match='queries'):
        tapa_attention(q, q[:, :, :3], q[:, :, :3], 0.1, 0.5)


def test_yarn_betas_must_be_in_order():
    kw = dict(pos_encoding='rope', rope_scaling='yarn', rope_factor=4.0, rope_original_block_size=16)
    for fast, slow in ((1.0, 32.0), (8.0, 8.0), (32.0, 0.0)):
        with pytest.raises(ValueError, match='yarn_beta_fast'):
            GPT(tiny_config(yarn_beta_fast=fast, yarn_beta_slow=slow, **kw))
    GPT(tiny_config(yarn_beta_fast=16.0, yarn_beta_slow=2.0, **kw))


@pytest.mark.parametrize('scaling', ['ntk', 'dynamic_ntk'])
def test_ntk_needs_a_head_dim_of_four(scaling):
    # base * factor^(D/(D-2)) divides by zero at D = 2: refused when the model is built
    kw = dict(pos_encoding='rope', rope_scaling=scaling, rope_factor=2.0, rope_original_block_size=8)
    with pytest.raises(ValueError, match='head dim of at least 4'):
        GPT(tiny_config(n_embd=4, n_head=2, **kw))
    GPT(tiny_config(n_embd=8, n_head=2, **kw))(torch.randint(0, 61, (1, 12)))  # D = 4 runs


# ---------------------------------------------------------------------------
# RoPE


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(5)
    D = 16
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    inv_freq, _ = rope_frequencies(D, 10000.0)
    angles = torch.outer(torch.arange(64).float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    rq = apply_rope(q.expand(1, 1, 64, D), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 64, D), cos, sin)[0, 0]
    scores = rq @ rk.T  # scores[m, n]
    for delta in (0, 1, 5, 17):
        diag = torch.diagonal(scores, offset=-delta)  # all pairs with m - n = delta
        assert diag.std() < 1e-4 * (1 + diag.abs().mean())
    assert abs(scores[10, 3] - scores[10, 4]) > 1e-3  # and it does depend on m - n


def test_rope_rotates_adjacent_pairs_by_pos_times_frequency():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # pair 0 = (1, 0)
    x[..., 3] = 1.0  # pair 1 = (0, 1)
    w = [1.0, 0.25]
    pos = 3.0
    cos = torch.tensor([[math.cos(pos * w[0]), math.cos(pos * w[1])]])
    sin = torch.tensor([[math.sin(pos * w[0]), math.sin(pos * w[1])]])
    y = apply_rope(x, cos, sin)[0, 0, 0]
    expected = [math.cos(3.0), math.sin(3.0), -math.sin(0.75), math.cos(0.75)]
    torch.testing.assert_close(y, torch.tensor(expected))


def published_inv_freq(D, base):
    return [1.0 / base ** (2 * i / D) for i in range(D // 2)]


@pytest.mark.parametrize('D', [16, 64, 128])
def test_rope_frequencies_match_published_formulas(D):
    base, s, L = 10000.0, 4.0, 2048
    plain = published_inv_freq(D, base)

    def check(got, expected):
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)

    inv, scale = rope_frequencies(D, base)
    check(inv, plain)
    assert scale == 1.0
    # ABF is just another base
    check(rope_frequencies(D, 5e5)[0], published_inv_freq(D, 5e5))
    # Position Interpolation: every frequency divided by s
    check(rope_frequencies(D, base, 'pi', s, L)[0], [w / s for w in plain])
    # NTK-aware: base' = base * s^(D/(D-2)); the lowest frequency ends up divided by exactly s
    ntk, _ = rope_frequencies(D, base, 'ntk', s, L)
    check(ntk, published_inv_freq(D, base * s ** (D / (D - 2))))
    assert ntk[0] == 1.0 and abs(ntk[-1].item() / plain[-1] - 1 / s) < 1e-5
    # dynamic NTK: unchanged up to the original length, then s' = s*T/L - (s-1)
    check(rope_frequencies(D, base, 'dynamic_ntk', s, L, seq_len=L)[0], plain)
    T = 3 * L
    s_dyn = s * T / L - (s - 1)
    check(rope_frequencies(D, base, 'dynamic_ntk', s, L, seq_len=T)[0],
          published_inv_freq(D, base * s_dyn ** (D / (D - 2))))
    # YaRN (Peng et al. 2023, Sec. 3.2-3.4, as in its reference code): ramp r(d) over pair index d
    # between floor(d(beta_fast)) and ceil(d(beta_slow)), d(b) = D*ln(L/(2*pi*b)) / (2*ln(base))
    lo = max(math.floor(D * math.log(L / (32 * 2 * math.pi)) / (2 * math.log(base))), 0)
    hi = min(math.ceil(D * math.log(L / (1 * 2 * math.pi)) / (2 * math.log(base))), D - 1)
    expected = []
    for i, w in enumerate(plain):
        r = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        expected.append(w * (1 - r) + (w / s) * r)
    yarn, yarn_scale = rope_frequencies(D, base, 'yarn', s, L)
    check(yarn, expected)
    assert yarn_scale == pytest.approx(0.1 * math.log(s) + 1)
    # high-frequency pairs untouched, low-frequency ones fully interpolated
    assert yarn[0] == pytest.approx(plain[0]) and yarn[-1] == pytest.approx(plain[-1] / s)


def test_yarn_scales_logits_by_mscale_squared():
    cfg = tiny_config(pos_encoding='rope', rope_scaling='yarn', rope_factor=4.0, rope_original_block_size=32)
    model = GPT(cfg)
    cos, sin = model.pe_tables(8, torch.device('cpu'))
    mscale = 0.1 * math.log(4.0) + 1
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, mscale ** 2))


# ---------------------------------------------------------------------------
# ALiBi


def test_alibi_slopes_are_the_papers_geometric_sequence():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(4).tolist() == pytest.approx([2 ** -(2 * (i + 1)) for i in range(4)])
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes
    assert alibi_slopes(6).tolist() == pytest.approx([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])


# ---------------------------------------------------------------------------
# the whole model: causality, KV cache, lengths


def model_variants():
    variants = [(pe, impl) for pe in PES for impl in ('naive', 'auto')]
    variants += [('tapa', 'chunked')]
    return variants


@pytest.mark.parametrize('pe,impl', model_variants())
def test_changing_a_future_token_never_changes_past_logits(pe, impl):
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding=pe, attn_impl=impl)).eval()
    idx = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        logits, _ = model(idx, targets=idx)
        for t in (5, 13, 19):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 7) % 61
            logits2, _ = model(changed, targets=changed)
            torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=1e-5)
            assert (logits2[:, t] - logits[:, t]).abs().max() > 1e-6  # it does change the present


def kv_variants():
    out = [dict(pos_encoding=pe) for pe in PES]
    out += [dict(pos_encoding='tapa', tapa_phase='linear'), dict(pos_encoding='tapa', attn_impl='chunked')]
    out += [dict(pos_encoding='rope', rope_scaling=s, rope_factor=2.0, rope_original_block_size=8)
            for s in ('pi', 'ntk', 'yarn')]
    return out


def position_sensitive(model):
    """At initialization (weights ~0.02) attention is nearly uniform and barely sees positions, so a
    wrong position would hardly show in the logits; larger q, k weights make it show."""
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(6.0)
    return model


def cached_and_prefix_logits(model, idx, prompt):
    """Last-position logits of each step of cached decoding (the prompt at once, then one token at a
    time), and of a full forward pass of the same text so far, without a cache."""
    with torch.no_grad():
        cache = model.new_kv_cache()
        cached = [model(idx[:, :prompt], kv_cache=cache)[0]]
        cached += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(prompt, idx.size(1))]
        prefix = [model(idx[:, :t + 1])[0][:, -1:] for t in range(prompt - 1, idx.size(1))]
    return torch.cat(cached, dim=1), torch.cat(prefix, dim=1)


@pytest.mark.parametrize('kw', kv_variants(), ids=lambda kw: '-'.join(str(v) for v in kw.values()))
def test_kv_cache_logits_equal_full_forward(kw):
    torch.manual_seed(0)
    model = position_sensitive(GPT(tiny_config(**kw)).eval())
    idx = torch.randint(0, 61, (2, 24))
    cached, prefix = cached_and_prefix_logits(model, idx, prompt=10)
    torch.testing.assert_close(cached, prefix, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # causality: one full forward holds every prefix's last logits
        full, _ = model(idx, targets=idx)
    torch.testing.assert_close(full[:, 9:], prefix, rtol=1e-4, atol=1e-4)


def test_dynamic_ntk_kv_cache_is_exact_in_the_first_layer():
    """Dynamic NTK's frequencies follow the current length, so a full forward of a longer text also
    changes the earlier positions (no causality test for it). With a cache, the first layer re-rotates
    its cached keys (exact); deeper layers keep keys and values computed at earlier lengths."""
    kw = dict(pos_encoding='rope', rope_scaling='dynamic_ntk', rope_factor=2.0, rope_original_block_size=8)
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    errors = []
    for n_layer in (1, 2):
        torch.manual_seed(0)
        model = position_sensitive(GPT(tiny_config(n_layer=n_layer, **kw)).eval())
        cached, prefix = cached_and_prefix_logits(model, idx, prompt=10)
        errors.append((cached - prefix).abs().max().item())
    assert errors[0] < 1e-4, errors
    assert 1e-4 < errors[1] < 5e-2, errors  # the approximation: visible, and small


def test_generate_with_cache_matches_greedy_without_cache():
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding='tapa')).eval()
    prompt = torch.randint(0, 61, (1, 5))
    out = sample.generate(model, prompt, 12, temperature=0)
    idx = prompt
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(idx)  # full forward every step, no cache
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


@pytest.mark.parametrize('pe', [pe for pe in PES if pe != 'learned'])
def test_non_learned_encodings_run_past_block_size(pe):
    model = GPT(tiny_config(pos_encoding=pe, block_size=16)).eval()
    idx = torch.randint(0, 61, (1, 40))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (1, 40, 61) and torch.isfinite(loss)


def test_learned_refuses_contexts_beyond_block_size():
    model = GPT(tiny_config(pos_encoding='learned', block_size=16))
    with pytest.raises(ValueError, match='learned position embeddings'):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match='interpolate_learned'):
        change_context(model, 32)
    change_context(model, 31, interpolate_learned=True)
    assert model.transformer.wpe.weight.shape[0] == 31
    model(torch.zeros(1, 31, dtype=torch.long))


def test_change_context_records_the_original_length_for_rope():
    model = GPT(tiny_config(pos_encoding='rope', block_size=16))
    change_context(model, 64, rope_scaling='yarn', rope_factor=4.0)
    cfg = model.config
    assert (cfg.block_size, cfg.rope_original_block_size, cfg.rope_scaling) == (64, 16, 'yarn')
    with pytest.raises(ValueError, match='unknown config field'):
        change_context(model, 64, rope_sclaing='yarn')


def test_tapa_adds_no_parameters_and_weights_are_tied():
    counts = {pe: GPT(tiny_config(pos_encoding=pe)).get_num_params() for pe in PES}
    assert counts['tapa'] == counts['rope'] == counts['nope'] == counts['alibi'] == counts['learned']
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    # GPT-2 init: residual projections are scaled down by 1/sqrt(2 * n_layer)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 0.003


def test_loss_at_init_is_near_uniform_and_training_step_reduces_it():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 61, (4, 16)), torch.randint(0, 61, (4, 16))
    _, loss = model(idx, targets=targets)
    assert abs(loss.item() - math.log(61)) < 0.1
    opt = train.configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), 'cpu')
    for _ in range(20):
        _, loss2 = model(idx, targets=targets)
        opt.zero_grad()
        loss2.backward()
        opt.step()
    assert loss2.item() < loss.item() - 0.5


# ---------------------------------------------------------------------------
# the small-scale knobs: tapa_phase_scale and the phase ramp are reparametrizations of Eq. 12


@pytest.mark.parametrize('phase', ['quadratic', 'linear'])
def test_phase_scale_equals_scaling_the_phase_projection_rows(phase):
    """phi -> g*phi must equal the plain Eq. 12 model whose q_P rows (and, for the linear phase, k_P rows)
    of c_attn are multiplied by g: the same function class, nothing else changed."""
    g = 0.3
    torch.manual_seed(0)
    scaled = GPT(tiny_config(tapa_phase_scale=g, tapa_phase=phase)).eval()
    with torch.no_grad():  # larger q, k than at init, where phi is so small that cos is ~1 whatever g is
        for block in scaled.transformer.h:
            block.attn.c_attn.weight *= 8
    plain = GPT(tiny_config(tapa_phase=phase)).eval()
    plain.load_state_dict(scaled.state_dict())
    C, H = 32, 2
    D = C // H
    with torch.no_grad():
        for block in plain.transformer.h:
            W = block.attn.c_attn.weight  # rows: q (C), k (C), v (C); each head's phase dims are its last D/2
            for h in range(H):
                W[h * D + D // 2:(h + 1) * D] *= g
                if phase == 'linear':
                    W[C + h * D + D // 2:C + (h + 1) * D] *= g
    idx = torch.randint(0, 61, (2, 20))
    a, _ = scaled(idx, targets=idx)
    b, _ = plain(idx, targets=idx)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the ramp multiplies on top: ramp r on scale g is scale g*r
    scaled.set_tapa_phase_ramp(0.5)
    ref = GPT(tiny_config(tapa_phase_scale=g * 0.5, tapa_phase=phase)).eval()
    ref.load_state_dict(scaled.state_dict())
    torch.testing.assert_close(scaled(idx, targets=idx)[0], ref(idx, targets=idx)[0], rtol=1e-5, atol=1e-5)
    assert (a - scaled(idx, targets=idx)[0]).abs().max() > 1e-2  # the ramp did change the function


@pytest.mark.parametrize('scale', [0.0, -1.0, float('nan')])
def test_bad_phase_scale_is_rejected(scale):
    with pytest.raises(ValueError, match='tapa_phase_scale'):
        GPT(tiny_config(tapa_phase_scale=scale))


def test_the_phase_ramp_reaches_per_layer_phase_scales(monkeypatch):
    """A TAPA variant whose table entry keeps one phase-scale module per layer (as tapa_probe.py's
    does) is ramped like the shared one."""
    import dataclasses
    import model as model_module
    monkeypatch.setitem(model_module.PE_TABLE, 'tapa', dataclasses.replace(model_module.PE_TABLE['tapa'], shared=False))
    gpt = GPT(tiny_config(tapa_phase_scale=0.5))
    gpt.set_tapa_phase_ramp(0.5)
    assert [b.attn.pe.dim_scale[-1].item() for b in gpt.transformer.h] == [0.25, 0.25]


def test_change_context_refuses_a_bad_override_before_changing_anything():
    model = GPT(tiny_config(pos_encoding='rope'))
    before = dict(vars(model.config))
    with pytest.raises(ValueError, match='rope_factor'):
        change_context(model, 64, rope_scaling='yarn', rope_factor=0.5)
    assert vars(model.config) == before  # rope_original_block_size not recorded, block_size unchanged
