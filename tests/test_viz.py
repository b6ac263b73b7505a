"""
Tests for viz_bias.py (the distance-bias figures) and for docs/positional_encodings.md's links into
model.py. The theory is checked against Monte Carlo through the model's own functions, and the
scores read out of a checkpoint are checked against what the attention block really computed.
"""

import ast
import math
import os
import re
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import viz_bias as vb  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

torch.set_num_threads(1)


def within(mc, se, exact, n_se=4.0):
    """Monte Carlo means agree with the exact values to n_se standard errors (plus float slack)."""
    return np.all(np.abs(mc - exact) <= n_se * se + 1e-9)


# -----------------------------------------------------------------------------
# RoPE: the closed form under Assumption 2.1 against Monte Carlo through apply_rope


@pytest.mark.parametrize('base', [100.0, 1e4])
def test_rope_monte_carlo_matches_closed_form(base):
    D = 16
    # pairs with unequal means so that both mu0 = E[A_d] and nu0 = E[B_d] are non-zero
    q_pair, k_pair = (1.0, 0.5), (0.8, -0.3)
    mu0, nu0 = vb.pair_means_to_mu_nu(q_pair, k_pair)
    assert (mu0, nu0) == pytest.approx((0.65, -0.7))
    distances = np.array([0, 1, 2, 5, 17, 100, 1000, 10000])
    samples = vb.rope_mc_scores(distances, D, base, 20000, np.tile(q_pair, D // 2), np.tile(k_pair, D // 2),
                                std=0.7, seed=1)
    mean, se = vb.mean_and_stderr(samples)
    exact = vb.rope_expected_score(distances, D, base, mu0, nu0)
    assert within(mean, se, exact), (mean, se, exact)
    # at distance 0 nothing rotates: E[score] = (D/2) mu0 / sqrt(D)
    assert exact[0] == pytest.approx(D / 2 * mu0 / math.sqrt(D))


def test_rope_near_beats_far_for_positive_mu0():
    """Theorem 2.2's message: with mu0 > 0 the near window has a larger expected score than the
    far one, and a larger base shrinks the gap between two fixed windows (Theorem 2.3)."""
    near, far = np.arange(0, 101), np.arange(10000, 10101)
    gaps = [vb.rope_expected_score(near, 64, b, 0.5, 0.0).mean() - vb.rope_expected_score(far, 64, b, 0.5, 0.0).mean()
            for b in (1e4, 1e8, 1e12)]
    assert gaps[0] > 0.5 and gaps[0] > gaps[1] > gaps[2] > 0


# -----------------------------------------------------------------------------
# TAPA: the closed forms for Gaussian q, k against Monte Carlo through tapa_scores


def test_gaussian_bilinear_cf_zero_mean_unit_variance():
    """With zero means and unit variances E[cos(t x.y)] = (1 + t^2)^(-d/2)."""
    t = np.array([0.0, 0.3, 1.0, 7.0])
    assert vb.gaussian_bilinear_cf(t, 5, 0.0, 0.0, 1.0).real == pytest.approx((1 + t ** 2) ** -2.5)


def test_tapa_monte_carlo_matches_closed_form():
    D, theta, alpha, a, b, s = 8, 0.5, 0.5, 0.5, 0.3, 0.8
    distances = np.array([0, 1, 3, 10, 1000])
    n = 40000
    scores, _ = vb.tapa_mc_scores(distances, D, theta, alpha, n, a, b, s, seed=2)
    mean, se = vb.mean_and_stderr(scores)
    exact_mean, exact_var = vb.tapa_expected_score(distances, D, theta, alpha, a, b, s)
    assert within(mean, se, exact_mean), (mean, se, exact_mean)
    # the variance's standard error from the fourth central moment
    centred = scores - scores.mean(0)
    var = centred.var(0, ddof=1)
    var_se = np.sqrt(((centred ** 4).mean(0) - var ** 2) / n)
    assert within(var, var_se, exact_var), (var, var_se, exact_var)


@pytest.mark.parametrize('D, alpha, distances, n', [
    (2, 0.5, [8, 16, 32, 64, 128, 256, 512], 400_000),  # d_P = 1: predicted slope -0.5
    (4, 0.5, [1, 2, 4, 8], 600_000),                     # d_P = 2: predicted slope -1
])
def test_tapa_decay_slope_matches_theorem(D, alpha, distances, n):
    """Gaussian q, k (a Schwartz density, so Theorem 3.2 applies): the log-log slope of E[score] at
    large distance is -alpha (1-theta) D. The amplitude part is fixed to 1 (std 0) so that the
    score is the phase factor itself and Monte Carlo can resolve it."""
    theta = 0.5
    mean_q = np.where(np.arange(D) < D // 2, 1.0, 0.0)  # amplitude dims 1, phase dims N(0, 1)
    std = np.where(np.arange(D) < D // 2, 0.0, 1.0)
    scores, _ = vb.tapa_mc_scores(distances, D, theta, alpha, n, mean_q, mean_q, std, seed=3)
    mean, se = vb.mean_and_stderr(scores)
    assert np.all(mean > 4 * se), "the test's samples must resolve the mean at every distance"
    theory = -vb.tapa_decay_exponent(alpha, theta, D)
    mc_slope = vb.fit_loglog_slope(distances, mean, se)
    exact_slope = vb.fit_loglog_slope(distances, vb.tapa_phase_factor(distances, D, theta, alpha, 0.0, 0.0, 1.0))
    assert abs(exact_slope - theory) < 0.06 * abs(theory), (exact_slope, theory)  # finite-t correction only
    assert abs(mc_slope - theory) < 0.15 * abs(theory), (mc_slope, theory)


def test_tapa_variance_stays_bounded_away_from_zero():
    """Theorem 3.3: liminf Var[score] >= sigma0^2 / 2, sigma0^2 = E[(q_i k_i)^2]; our closed form's
    limit is E[amp^2] / 2. Monte Carlo far away sits above the bound."""
    a, b, s = 0.5, 0.5, 1.0
    bound = (a * a + s * s) * (b * b + s * s) / 2
    far = np.array([1000, 100000])
    scores, _ = vb.tapa_mc_scores(far, 8, 0.5, 0.5, 40000, a, b, s, seed=4)
    assert np.all(scores.var(0) > 0.9 * bound)
    d_amp = 4
    limit = ((a * a + s * s) * (b * b + s * s) + (d_amp - 1) * a * a * b * b) / 2
    assert scores.var(0) == pytest.approx([limit, limit], rel=0.05)
    # the paper's setting, D = 64, alpha = 0.1, theta = 0.5: the bound holds at every distance
    grid = np.unique(np.round(np.logspace(0, 7, 200)))
    _, var = vb.tapa_expected_score(grid, 64, 0.5, 0.1, a, b, s)
    assert np.all(var >= bound)


# -----------------------------------------------------------------------------
# FIRE's and CoPE's figures: what they draw is what model.py computes


def test_fire_figure_draws_the_normalized_distance():
    """Head 0 of the figure's hand-set MLP hands back u = log(1 + c(m-n)) / log(1 + c max(L, m)) itself,
    in [0, 1] at any length; head 1 is -12 relu(u - 1/2)."""
    params = vb.fire_params(block_size=128)
    c, L = 0.1, 32.0
    for m in (7, 31, 127, 2047):
        u = vb.fire_row(params, m, head=0).double()
        dist = m - torch.arange(m + 1, dtype=torch.float64)
        want = torch.log1p(c * dist) / math.log1p(c * max(L, m))
        torch.testing.assert_close(u, want, rtol=1e-5, atol=1e-6)
        assert u.min() >= 0 and u.max() <= 1 + 1e-6
        torch.testing.assert_close(vb.fire_row(params, m, head=1).double(), -12 * (want - 0.5).clamp(min=0),
                                   rtol=1e-5, atol=1e-5)


def test_cope_positions_are_those_of_cope_attention():
    """softmax(q.k/sqrt(D) + q.e[p]) @ v with viz_bias's p (e interpolated as CoPE's Eq. 5) equals
    model.cope_attention, for a KV cache's last queries too; and the figure's sentence counts spaces."""
    from model import cope_attention
    torch.manual_seed(0)
    B, H, Tq, Tk, D, npos = 2, 3, 5, 12, 8, 6  # npos < Tk: some positions clamped to the last
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) * 2 for T in (Tq, Tk, Tk))
    pos_emb = torch.randn(D, npos, dtype=torch.float64)
    p = vb.cope_positions(q, k, npos)
    at_integers = q @ pos_emb
    lo, hi = p.floor().long(), p.ceil().long()
    w = p - p.floor()
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D) + at_integers.gather(-1, hi) * w + at_integers.gather(-1, lo) * (1 - w)
    mask = torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    want = scores.masked_fill(~mask, float('-inf')).softmax(-1) @ v
    torch.testing.assert_close(cope_attention(q, k, v, pos_emb), want)
    q, k = vb.cope_example()
    p = vb.cope_positions(q, k)[0, 0, -1]  # the last query against every key
    spaces = torch.tensor([float(ch == ' ') for ch in vb.COPE_SENTENCE]).flip(0).cumsum(0).flip(0)
    torch.testing.assert_close(p, spaces.double(), atol=1e-3, rtol=0)


# -----------------------------------------------------------------------------
# scores out of a checkpoint


def tiny_config(pos_encoding, **kw):
    return GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=16, pos_encoding=pos_encoding,
                     attn_impl='naive', **kw)


@pytest.mark.parametrize('pos_encoding, extra', [
    ('tapa', {}), ('tapa', dict(tapa_phase='linear', tapa_theta=0.25)), ('rope', {}),
    ('tapa', dict(tapa_phase_scale=0.05)), ('tapa', dict(tapa_phase_scale=0.05, tapa_phase='linear')),
    ('rope', dict(rope_scaling='yarn', rope_factor=4.0, rope_original_block_size=16)),
    ('alibi', {}), ('nope', {}), ('learned', {}),
])
def test_scores_reproduce_the_attention_output(pos_encoding, extra):
    """softmax(our pre-softmax scores) @ v must equal what each attention block fed to c_proj."""
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding, **extra)).eval()
    with torch.no_grad():  # larger q, k than at init: angles and scores far from 0, so that a missing
        for block in model.transformer.h:  # scale or a wrong position would show
            block.attn.c_attn.weight.mul_(8.0)
    idx = torch.randint(0, 256, (2, 24))
    inputs_to_proj = []
    handles = [b.attn.c_proj.register_forward_pre_hook(lambda m, inp: inputs_to_proj.append(inp[0]))
               for b in model.transformer.h]
    qkv = vb.capture_qkv(model, idx)
    for h in handles:
        h.remove()
    assert len(qkv) == len(inputs_to_proj) == 2
    for layer, ((q, k, v), y) in enumerate(zip(qkv, inputs_to_proj)):
        probs = vb.causal_softmax(vb.pre_softmax_scores(model, layer, q, k))
        out = (probs @ v).transpose(1, 2).reshape(y.shape)
        torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-5)


def test_delta_and_distance_helpers():
    T = 20
    dist = vb.distance_matrix(T).float()
    scores = (-dist)[None, None].expand(1, 3, T, T)  # score = -(m-n): near keys score higher
    delta = vb.delta_short_long(scores, d_short=2, d_long=10)
    # query m: short keys at distance 1, 2 -> mean -1.5; far keys at distance 10..m -> mean -(10+m)/2
    m = np.arange(10, T)
    expected = np.tile(-1.5 + (10 + m) / 2, 3)
    assert delta == pytest.approx(expected)
    # a uniform head: the totals equal the closed form of 1/(m+1) weights, and a query's masses add to 1
    probs = vb.causal_softmax(torch.zeros(2, T, T))
    for first in (0, 15):
        total, rows = vb.attention_by_distance(probs, first)
        ut, urows = vb.uniform_attention_by_distance(T, first)
        assert rows == 2 * urows == 2 * (T - first) and total == pytest.approx(2 * ut)
        assert vb.binned_mass(total, rows, vb.log_bins(T)).sum() == pytest.approx(1.0)
    # by hand: the last query (m = 19) of a uniform head puts 1/20 on each key, so 4/20 in bin 4..7
    total, rows = vb.attention_by_distance(probs, T - 1)
    assert vb.binned_mass(total, rows, vb.log_bins(T))[3] == pytest.approx(4 / 20)
    # the bins cover every distance exactly once
    covered = [d for lo, hi in vb.log_bins(T) for d in range(lo, hi + 1)]
    assert covered == list(range(T))
    with pytest.raises(ValueError, match='d_short'):
        vb.delta_short_long(scores, d_short=10, d_long=5)


def save_tiny_checkpoint(path, pos_encoding):
    torch.manual_seed(1)
    cfg = tiny_config(pos_encoding)
    model = GPT(cfg)
    torch.save({'model': model.state_dict(), 'model_args': asdict(cfg),
                'config': {'dataset': 'tiny', 'tokenizer': 'byte'}}, path)
    return path


def test_missing_inputs_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match='train.py'):
        vb.load_checkpoint(str(tmp_path / 'nope.pt'))
    ck = {'config': {'dataset': 'pg19', 'tokenizer': 'byte'}}
    with pytest.raises(SystemExit, match='prepare.py --tokenizer byte'):
        vb.load_tokens(ck, str(tmp_path), 'validation')
    np.arange(1, 9, dtype=np.uint16).tofile(tmp_path / 'train.bin')
    with pytest.raises(SystemExit, match=r'--split=valdation: .* has no such split; it has train$'):
        vb.load_tokens(ck, str(tmp_path), 'valdation')
    with pytest.raises(SystemExit, match='prepare.py --tokenizer byte'):  # a split not prepared yet: how to
        vb.load_tokens(ck, str(tmp_path), 'validation')
    with pytest.raises(SystemExit, match='unknown setting'):
        vb.parse_args(['--mc_sample=3'])
    with pytest.raises(SystemExit, match='need trained checkpoints'):
        vb.main(['--figures=delta_hist', f'--out_dir={tmp_path}'])
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(SystemExit, match=r'--out_dir=.*afile is a file: give a folder'):
        vb.main(['--figures=nope_mask', f"--out_dir={tmp_path / 'afile'}"])
    with pytest.raises(SystemExit, match='--dpi=0 must be at least 1'):  # else: matplotlib's error, after the work
        vb.main(['--figures=nope_mask', f'--out_dir={tmp_path}', '--dpi=0'])


def test_checkpoint_as_out_dir_and_unreadable_ones(tmp_path):
    """--ckpt takes out_dirs, as eval_ppl.py does; a truncated file or weights that do not fit their
    model_args are a message, not a traceback."""
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    path = save_tiny_checkpoint(str(out_dir / 'ckpt.pt'), 'rope')
    model, ck = vb.load_checkpoint(str(out_dir))
    assert model.config.pos_encoding == 'rope' and not model.training
    for k, v in ck['model'].items():
        assert torch.equal(model.state_dict()[k], v), k
    with open(path, 'rb') as f:
        raw = f.read()
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(SystemExit, match=r"cannot read the checkpoint .*truncated\.pt.*truncated or corrupt"):
        vb.load_checkpoint(str(truncated))
    ck['model_args']['pos_encoding'] = 'learned'
    torch.save(ck, str(tmp_path / 'relabelled.pt'))
    with pytest.raises(SystemExit, match=r"relabelled\.pt: .*weights do not match .*transformer\.wpe\.weight"):
        vb.load_checkpoint(str(tmp_path / 'relabelled.pt'))


@pytest.mark.parametrize('arg, message', [
    ('--n_seqs=0', r"--n_seqs=0 must be at least 1"),
    ('--map_layer=2', r"--map_layer=2: .*ckpt\.pt has 2 layers, 0\.\.1 \(or -1 for the last\)"),
    ('--map_layer=-3', r"--map_layer=-3: .* has 2 layers"),
    ('--map_head=5', r"--map_head=5: .* has 2 heads, 0\.\.1"),
    ('--d_long=100', r"--d_short=1 and --d_long=100 must be distances below the sequence length 16"),  # else: traceback
])
def test_out_of_range_settings(tmp_path, arg, message):
    pytest.importorskip('matplotlib', reason='matplotlib is optional (plots only): pip install matplotlib')
    ckpt = save_tiny_checkpoint(str(tmp_path / 'ckpt.pt'), 'tapa')
    data = tmp_path / 'data'
    data.mkdir()
    np.arange(1, 200, dtype=np.uint16).tofile(data / 'validation.bin')
    with pytest.raises(SystemExit, match=message):
        vb.main([f'--out_dir={tmp_path / "figs"}', f'--ckpt={ckpt}', f'--data_dir={data}', '--figures=attention_maps',
                 '--map_len=8', '--seq_len=16', arg])
    assert not (tmp_path / 'figs' / 'attention_maps.png').exists()


@pytest.mark.parametrize('arg, message', [
    ('--rope_bases=abc', r"--rope_bases=abc must be comma-separated numbers"),
    ('--rope_bases=-1', r"--rope_bases=-1 must be RoPE bases, numbers > 1"),
    ('--head_dim=3', r"--head_dim=3 must be even and at least 2"),
    ('--tapa_theta=0.3', r"--tapa_theta=0\.3 does not fit: tapa_theta=0\.3 with head dim 64 gives an amplitude part of 19\.2"),
    ('--tapa_settings=1:2', r"--tapa_settings=1:2 does not fit: tapa_theta=2\.0"),
    ('--tapa_settings=0:0.5', r"--tapa_settings=0:0\.5 has alpha=0: TAPA's alpha must be > 0"),
    ('--tapa_settings=0.5', r"--tapa_settings=0\.5 must be alpha:theta pairs"),
    ('--near=5,1', r"--near=5,1 must be a window of distances lo,hi with 0 <= lo < hi"),
    ('--far=10000', r"--far=10000 must be a window"),
    ('--mc_samples=0', r"--mc_samples=0 must be at least 1"),
    ('--d_long=-1', r"--d_long=-1 must be >= 0"),
    ('--d_short=50', r"--d_short=50 must be less than --d_long=10"),
])
def test_bad_figure_settings_fail_before_any_figure(tmp_path, arg, message):
    """Checked up front: otherwise a traceback from numpy or torch, after the figures before it."""
    pytest.importorskip('matplotlib', reason='matplotlib is optional (plots only): pip install matplotlib')
    with pytest.raises(SystemExit, match=r"^viz_bias\.py: " + message):
        vb.main([f'--out_dir={tmp_path / "figs"}', '--figures=rope_bias,tapa_decay', '--d_long=10', arg])
    assert not (tmp_path / 'figs').exists()


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_prints_usage_and_settings(capsys, flag):
    with pytest.raises(SystemExit) as e:
        vb.main([flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'Pictures of the distance bias' in out and '  --n_seqs=8\n' in out


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit, match='pip install matplotlib'):
        vb.get_pyplot()


def test_figures_are_written(tmp_path):
    pytest.importorskip('matplotlib', reason='matplotlib is optional (plots only): pip install matplotlib')
    data = tmp_path / 'data'
    data.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(1, 256, size=5000).astype(np.uint16).tofile(data / 'validation.bin')
    ckpts = [save_tiny_checkpoint(str(tmp_path / f'{pe}.pt'), pe) for pe in ('rope', 'tapa', 'learned')]
    out = tmp_path / 'figs'
    written = vb.main([f'--out_dir={out}', f'--ckpt={",".join(ckpts)}', f'--data_dir={data}',
                       '--mc_samples=200', '--tapa_mc_samples=2000', '--rope_bases=1e4,1e8', '--tapa_settings=0.5:0.5',
                       '--n_seqs=2', '--map_len=24', '--dpi=40'])
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(f'{n}.png' for n in vb.ALL_FIGURES)
    for n in ('sinusoidal', 't5_buckets', 'kerple_bias', 'fire_bias', 'xpos_decay', 'cope_positions'):  # the course encodings'
        assert f'{n}.png' in names, n
    for p in written:
        with open(p, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n', p


# -----------------------------------------------------------------------------
# the doc's links into model.py

DOC = os.path.join(ROOT, 'docs', 'positional_encodings.md')
LINK = re.compile(r'\[`([^`]+)`\]\(\.\./(\w+\.py)#L(\d+)-L(\d+)\)')  # into model.py, fast_attention.py...


def block_end(lines, start):
    """Last line (1-based) of the def/class starting at line `start`: the last code line before the
    next code line indented no deeper than the def itself (blank and comment-only lines skipped).
    Plain indentation rules, no ast: an independent check of docs/update_refs.py."""
    indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
    last = start
    for i in range(start, len(lines)):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        if len(line) - len(line.lstrip()) <= indent and not line.lstrip().startswith(')'):
            break
        last = i + 1
    return last


def test_doc_line_references_point_at_what_they_name():
    with open(DOC) as f:
        doc = f.read()
    refs = LINK.findall(doc)
    assert len(refs) >= 10, "the doc should link the code it explains"
    fix = "; run `python docs/update_refs.py` to refresh the line numbers"
    for name, file, a, b in refs:
        with open(os.path.join(ROOT, file)) as f:
            lines = f.read().split('\n')
        a, b = int(a), int(b)
        assert 1 <= a <= b <= len(lines), f"{name}: lines {a}-{b} are outside {file}{fix}"
        if re.fullmatch(r'[A-Za-z_][\w.]*', name):  # a function, class or method: Name or Class.method
            short = name.split('.')[-1]
            assert re.match(rf'\s*(def|class) {short}\b', lines[a - 1]), \
                f"{file}#L{a} should begin `def {short}`/`class {short}` but is {lines[a - 1]!r}{fix}"
            assert b == block_end(lines, a), f"{name} ends at line {block_end(lines, a)}, not {b}{fix}"
        else:  # a code snippet: on exactly one line of the file (so it cannot be confused), which the link starts at
            assert sum(name in line for line in lines) == 1, f"`{name}` must be on exactly one line of {file}"
            assert name in lines[a - 1], f"`{name}` is not on {file}#L{a}{fix}"


@pytest.mark.parametrize('pos_encoding', ['nope', 'alibi'])
def test_delta_through_the_model_matches_scores_computed_here(pos_encoding):
    """Delta of the scores viz_bias gets through the model's attention (log-probabilities) equals Delta
    of the scores written out here: q.k/sqrt(D), minus 2^(-8(h+1)/H) (m-n) for ALiBi. Finite: the
    masked future must not turn the means into NaN."""
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)
    idx = torch.randint(0, 256, (1, 60))
    q, k, _ = vb.capture_qkv(model, idx)[0]
    H, T, D = q.size(1), q.size(2), q.size(3)
    expected = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(D)
    if pos_encoding == 'alibi':
        distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
        expected = expected - slopes[:, None, None] * distance
    got = vb.delta_short_long(vb.pre_softmax_scores(model, 0, q, k), 3, 30)
    want = vb.delta_short_long(expected.float(), 3, 30)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
