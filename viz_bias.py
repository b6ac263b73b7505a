"""
Pictures of the distance bias of positional encodings: the argument of the TAPA paper
(arXiv 2509.12635, Sec. 2-3 and Appendix I) drawn, plus one teaching figure per encoding.

    python viz_bias.py                                   # theory + Monte Carlo figures -> figures/
    python viz_bias.py --ckpt=out-tiny-rope/ckpt.pt,out-tiny-tapa/ckpt.pt
                                                         # + figures measured on trained models
    python viz_bias.py --out_dir=docs/figures --figures=rope_bias,tapa_decay

Settings are the module globals below, overridden by --key=value (nanoGPT style).

What the figures show (the derivations are in docs/positional_encodings.md):

  rope_bias.png    RoPE. Under the paper's Assumption 2.1 (E[A_d] = mu0, E[B_d] = nu0 for every pair
                   d of dims, where A_d, B_d are the pair's dot and cross products), the expected
                   score of a query m and a key n is a fixed function of the distance alone,
                       E[score(m, n)] = 1/sqrt(D) * sum_d ( mu0 cos((m-n) w_d) + nu0 sin((m-n) w_d) ),
                   large near the diagonal and small (but never settling) far away: a built-in
                   preference for near tokens. Closed form for three bases, Monte Carlo on top,
                   and the histogram of score(near) - score(far) for random q, k.
  tapa_decay.png   TAPA. For Gaussian q, k the expected score decays like |m-n|^(-alpha(1-theta)D)
                   (the paper's Theorem 3.2), on log-log axes with that slope drawn, while the
                   variance of a single score stays above sigma0^2/2 (Theorem 3.3): the average
                   bias vanishes but individual far tokens can still win the softmax.
  rope_scaling.png the RoPE context-extension family (PI, NTK, dynamic NTK, YaRN, ABF): which
                   rotation frequencies each of them changes.
  alibi_bias.png   ALiBi's per-head linear penalty and how far each head can see because of it.
  nope_mask.png    NoPE: no position in the score, yet the causal mask alone leaks position.
  sinusoidal.png   the sinusoidal table PE(m, d), and PE(m).PE(n), a function of m - n alone.
  t5_buckets.png   T5's bucket of each distance: exact to 15, log-spaced to 128, one shared beyond.
  kerple_bias.png  Kerple's log bias -r1 log(1 + r2 (m-n)) for a few (r1, r2), next to ALiBi's lines.
  fire_bias.png    FIRE's normalized distance u = psi(m-n)/psi(max(L, m)), the input of its MLP, for
                   queries before and past the training length (always in [0, 1]), and one f of it.
  xpos_decay.png   xPos: the decay zeta_i^((m-n)/512) of a few pairs i of dims, up to 16k tokens.
  cope_positions.png  CoPE's contextual positions on a sentence whose gates fire on spaces: it
                   counts words, where the token distance counts bytes.
  From trained checkpoints (--ckpt), on real validation text:
  delta_hist.png   Appendix I of the paper: Delta = mean pre-softmax score over keys at distance
                   1..d_short minus mean over keys at distance >= d_long, per layer, head and query.
  attention_vs_distance.png  mean attention mass per log-spaced distance bin.
  attention_maps.png         one head's attention map on one sequence, per checkpoint.
  learned_positions.png      (learned-PE checkpoints only) cosine similarity of the position embeddings.

The small functions below (closed forms, Monte Carlo estimators, score extraction) are what the
figures are made of; tests/test_viz.py checks them against each other and against the model.
"""

import dataclasses
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

import runtime
from configurator import ConfigError, get_overrides
from eval_ppl import resolve_ckpt_path
from model import (PE_TABLE, XPOS_GAMMA, FIREParams, KerpleParams, Positions, alibi_bias, alibi_slopes, apply_rope,
                   causal_mask, dot_product_attention, fire_bias, rope_frequencies, sinusoidal_embedding, t5_bucket,
                   tapa_distance_weight, tapa_scores, tapa_split)
from model import cope_positions as model_cope_positions  # (this file's cope_positions starts from q and k)

# -----------------------------------------------------------------------------
# settings (override with --key=value)
out_dir = 'figures'
figures = 'all'           # 'all' or a comma list of: rope_bias, tapa_decay, rope_scaling, alibi_bias,
                          # nope_mask, sinusoidal, t5_buckets, kerple_bias, fire_bias, xpos_decay,
                          # cope_positions, delta_hist,
                          # attention_vs_distance, attention_maps, learned_positions
dpi = 80                  # figures stay small (the docs commit them)
seed = 1337
# synthetic queries and keys: every coordinate independent, q_i ~ N(q_mean, qk_std^2), k_i ~ N(k_mean, qk_std^2)
head_dim = 64
q_mean = 0.5
k_mean = 0.5
qk_std = 1.0
mc_samples = 20000        # Monte Carlo samples per distance
tapa_mc_samples = 200000  # more for the small-head decay plot (cheap), to push the noise floor down
rope_bases = '1e4,5e5,1e8'
tapa_alpha = 0.1          # the paper's defaults, for the D = head_dim comparisons
tapa_theta = 0.5
tapa_small_head_dim = 4   # a head this small makes TAPA's polynomial tail visible to Monte Carlo
tapa_settings = '1.0:0.75,0.5:0.75,0.5:0.5,0.1:0.5'  # alpha:theta pairs for the decay plot
near = '0,100'            # distance windows of the paper's Appendix I
far = '10000,10100'
# trained checkpoints
ckpt = ''                 # comma-separated out_dirs or ckpt.pt paths of train.py runs
device = 'cpu'
data_dir = ''             # default: data/<dataset>/<tokenizer> from the checkpoint's training config
split = 'validation'
seq_len = 0               # 0: each checkpoint's block_size
n_seqs = 8                # validation windows per checkpoint
d_short = 0               # 0: seq_len // 16
d_long = 0                # 0: seq_len // 2
map_len = 128             # tokens in the attention map
map_layer = -1            # which layer's head to draw (-1: the last)
map_head = 0
SETTINGS = {k: v for k, v in list(globals().items())
            if not k.startswith('_') and k != 'SETTINGS' and isinstance(v, (int, float, bool, str))}
# -----------------------------------------------------------------------------

ALL_FIGURES = ('rope_bias', 'tapa_decay', 'rope_scaling', 'alibi_bias', 'nope_mask',
               'sinusoidal', 't5_buckets', 'kerple_bias', 'fire_bias', 'xpos_decay', 'cope_positions',
               'delta_hist', 'attention_vs_distance', 'attention_maps', 'learned_positions')
CKPT_FIGURES = ('delta_hist', 'attention_vs_distance', 'attention_maps', 'learned_positions')


def get_pyplot():
    """matplotlib is optional for the project (plots only), so import it only when drawing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("viz_bias.py draws with matplotlib, which is not installed: "
                         "pip install matplotlib  (or pip install -r requirements-dev.txt)") from None
    matplotlib.use('Agg')  # files only, no window
    import matplotlib.pyplot as plt
    plt.rcParams.update({'font.size': 9, 'legend.fontsize': 7.5, 'axes.titlesize': 9})
    return plt


# =============================================================================
# Part 1. RoPE under the paper's Assumption 2.1: a closed form and a Monte Carlo estimate
#
# Pair d of dims (2d, 2d+1) is rotated by the angle pos * w_d, w_d = base^(-2d/D). Writing
#     A_d = q_2d k_2d + q_2d+1 k_2d+1   (the pair's dot product)
#     B_d = q_2d k_2d+1 - q_2d+1 k_2d   (the pair's cross product)
# the rotated score is (paper Eq. 3, with our angle convention: the paper writes 2*pi*theta_d)
#     score(m, n) = 1/sqrt(D) * sum_d ( A_d cos((m-n) w_d) + B_d sin((m-n) w_d) ).
# Assumption 2.1: E[A_d] = mu0 and E[B_d] = nu0 for all pairs and positions. Then the expectation
# is linear in A_d, B_d and the rotation is deterministic:
#     E[score(m, n)] = 1/sqrt(D) * sum_d ( mu0 cos((m-n) w_d) + nu0 sin((m-n) w_d) ).
# With q_i ~ N(a, s^2) and k_i ~ N(b, s^2) in every coordinate, independent: mu0 = 2ab, nu0 = 0.


def rope_inv_freq(head_dim, base):
    """w_d = base^(-2d/D), d = 0..D/2-1, in float64 (written out again here on purpose, so the
    closed form below does not lean on the model code it is used to check)."""
    return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def pair_means_to_mu_nu(q_pair_mean, k_pair_mean):
    """(mu0, nu0) = (E[A_d], E[B_d]) for independent q and k whose pairs have means
    q_pair_mean = (E q_2d, E q_2d+1) and k_pair_mean = (E k_2d, E k_2d+1)."""
    (a0, a1), (b0, b1) = q_pair_mean, k_pair_mean
    return a0 * b0 + a1 * b1, a0 * b1 - a1 * b0


def rope_expected_score(distances, head_dim, base, mu0, nu0):
    """E[score] at each distance m-n, the closed form above (numpy, float64)."""
    lam = np.asarray(distances, dtype=np.float64)[..., None]
    w = rope_inv_freq(head_dim, base)
    return (mu0 * np.cos(lam * w) + nu0 * np.sin(lam * w)).sum(-1) / math.sqrt(head_dim)


def sample_qk(n, head_dim, q_mean, k_mean, std, generator, n_keys=None):
    """n independent draws of q and k with independent Gaussian coordinates. q_mean, k_mean, std:
    numbers or length-head_dim vectors. q is (n, D); k is (n, D), or (n, n_keys, D) when n_keys
    is given (a fresh key per distance). float64, so sampling noise is the only error left."""
    def draw(mean, shape):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        s = torch.as_tensor(std, dtype=torch.float64)
        return mean + s * torch.randn(shape, generator=generator, dtype=torch.float64)
    q = draw(q_mean, (n, head_dim))
    k = draw(k_mean, (n, head_dim) if n_keys is None else (n, n_keys, head_dim))
    return q, k


def rope_pair_scores(q, k, distances, head_dim, base):
    """RoPE scores q_m.k_n / sqrt(D) with the query at position m = distance and the key at n = 0,
    through the model's own rope_frequencies and apply_rope. q, k (..., D); distances broadcast
    against q's leading dims. Only m - n matters, so putting the key at 0 loses nothing."""
    inv_freq, attention_scale = rope_frequencies(head_dim, base)
    lam = torch.as_tensor(distances, dtype=torch.float64)
    angles = lam[..., None] * inv_freq.double()
    cos, sin = angles.cos() * attention_scale, angles.sin() * attention_scale
    q_rot = apply_rope(q, cos, sin)  # the query, rotated by its position
    # the key sits at position 0, where the rotation is the identity (times YaRN's scale, 1 here)
    return (q_rot * k * attention_scale).sum(-1) / math.sqrt(head_dim)


def rope_mc_scores(distances, head_dim, base, n_samples, q_mean, k_mean, std, seed=0, batch=4096):
    """Monte Carlo: (n_samples, len(distances)) scores. Each sample draws one (q, k) and evaluates
    it at every distance, so a row is one q, k pair seen at all distances."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.as_tensor(distances, dtype=torch.float64)
    out = []
    for start in range(0, n_samples, batch):
        b = min(batch, n_samples - start)
        q, k = sample_qk(b, head_dim, q_mean, k_mean, std, g)
        out.append(rope_pair_scores(q[:, None, :], k[:, None, :], lam[None, :], head_dim, base))
    return torch.cat(out).numpy()


def rope_mc_delta(head_dim, base, n_samples, q_mean, k_mean, std, near, far, seed=0):
    """The paper's Appendix I experiment on synthetic q, k: Delta = score(lambda) - score(Lambda),
    lambda uniform in the near window, Lambda uniform in the far one, a fresh q, k for each score."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.randint(near[0], near[1] + 1, (n_samples,), generator=g)
    Lam = torch.randint(far[0], far[1] + 1, (n_samples,), generator=g)
    q1, k1 = sample_qk(n_samples, head_dim, q_mean, k_mean, std, g)
    q2, k2 = sample_qk(n_samples, head_dim, q_mean, k_mean, std, g)
    return (rope_pair_scores(q1, k1, lam, head_dim, base) - rope_pair_scores(q2, k2, Lam, head_dim, base)).numpy()


# =============================================================================
# Part 2. TAPA for Gaussian queries and keys: closed forms and Monte Carlo
#
# score(m, n) = amp * cos(t * q_P.k_P),   amp = q_A.k_A / sqrt(d_A),   t = 2*pi*|m-n|^alpha / sqrt(d_P),
# d_A = theta*D, d_P = (1-theta)*D. The key fact is the characteristic function of a bilinear form
# of independent Gaussians x ~ N(a 1, s^2 I_d), y ~ N(b 1, s^2 I_d): conditioning on x,
#     E[exp(i t x.y) | x] = exp(i t b sum(x) - t^2 s^2 |x|^2 / 2),
# and one Gaussian integral per coordinate of x gives, with u = 1 + t^2 s^4,
#     E[exp(i t x.y)] = u^(-d/2) * exp( (i t d a b - t^2 s^2 d (a^2 + b^2) / 2) / u ).
# With zero means and s = 1 that is (1 + t^2)^(-d/2). Its modulus falls like t^(-d), and
# t ~ |m-n|^alpha, so E[cos(t q_P.k_P)] ~ |m-n|^(-alpha d_P) = |m-n|^(-alpha (1-theta) D):
# exactly the rate of the paper's Theorem 3.2. The amplitude and phase parts are independent here,
# so E[score] = E[amp] * E[cos], with E[amp] = sqrt(d_A) a b. For the variance, cos^2 = (1 + cos 2x)/2:
#     Var[score] = E[amp^2] (1 + E[cos(2t q_P.k_P)]) / 2 - E[score]^2  ->  E[amp^2] / 2  far away,
#     E[amp^2] = (a^2 + s^2)(b^2 + s^2) + (d_A - 1) a^2 b^2  >=  sigma0^2 = E[(q_i k_i)^2] = (a^2 + s^2)(b^2 + s^2),
# which is the paper's Theorem 3.3 (liminf Var >= sigma0^2 / 2).


def tapa_dims(head_dim, theta):
    """(d_A, d_P), the same rounding as model.tapa_split, written out again for the closed forms."""
    d_amp = int(round(theta * head_dim))
    return d_amp, head_dim - d_amp


def gaussian_bilinear_cf(t, d, a, b, s):
    """E[exp(i t x.y)] for independent x ~ N(a, s^2 I_d) and y ~ N(b, s^2 I_d) (complex, numpy)."""
    t = np.asarray(t, dtype=np.float64)
    u = 1.0 + t ** 2 * s ** 4
    return u ** (-d / 2) * np.exp((1j * t * d * a * b - t ** 2 * s ** 2 * d * (a * a + b * b) / 2) / u)


def tapa_phase_t(distances, alpha, d_phase):
    """t = 2*pi*|m-n|^alpha / sqrt(d_P): the factor that multiplies q_P.k_P inside the cos."""
    return 2 * math.pi * np.abs(np.asarray(distances, dtype=np.float64)) ** alpha / math.sqrt(d_phase)


def tapa_expected_score(distances, head_dim, theta, alpha, q_mean, k_mean, std):
    """(E[score], Var[score]) of TAPA at each distance, closed form, for q_i ~ N(q_mean, std^2) and
    k_i ~ N(k_mean, std^2) independent in every coordinate (quadratic phase)."""
    a, b, s = q_mean, k_mean, std
    d_amp, d_phase = tapa_dims(head_dim, theta)
    t = tapa_phase_t(distances, alpha, d_phase)
    amp_mean = math.sqrt(d_amp) * a * b
    amp_sq = (a * a + s * s) * (b * b + s * s) + (d_amp - 1) * a * a * b * b
    cos1 = gaussian_bilinear_cf(t, d_phase, a, b, s).real
    cos2 = gaussian_bilinear_cf(2 * t, d_phase, a, b, s).real
    mean = amp_mean * cos1
    return mean, amp_sq * (1 + cos2) / 2 - mean ** 2


def tapa_phase_factor(distances, head_dim, theta, alpha, q_mean, k_mean, std):
    """E[cos(2*pi*|m-n|^alpha * phi)] = E[score(m,n)] / E[score(m,m)]: the part that depends on distance."""
    _, d_phase = tapa_dims(head_dim, theta)
    return gaussian_bilinear_cf(tapa_phase_t(distances, alpha, d_phase), d_phase, q_mean, k_mean, std).real


def tapa_decay_exponent(alpha, theta, head_dim):
    """Theorem 3.2's rate: |E[score]| <= C |m-n|^(-alpha (1-theta) D)."""
    return alpha * (1 - theta) * head_dim


def tapa_mc_scores(distances, head_dim, theta, alpha, n_samples, q_mean, k_mean, std,
                   seed=0, phase='quadratic', batch=4096):
    """Monte Carlo through the model's tapa_scores: returns (scores, cos_of_angle), each
    (n_samples, len(distances)); one query per sample, a fresh key for every distance, so the
    samples at a distance are independent. The |m-n|^alpha weights come from the model's
    tapa_distance_weight (a query at position L and keys at 0..L, picking the wanted columns)."""
    d_amp, _ = tapa_split(head_dim, theta)
    dist = torch.as_tensor(distances, dtype=torch.long)
    L = int(dist.max())
    weight = tapa_distance_weight(L, 1, 0, L + 1, alpha, 'cpu')[:, L - dist]  # (1, n_distances)
    g = torch.Generator().manual_seed(seed)
    scores, coss = [], []
    for start in range(0, n_samples, batch):
        b = min(batch, n_samples - start)
        q, k = sample_qk(b, head_dim, q_mean, k_mean, std, g, n_keys=len(dist))
        s, _, angle = tapa_scores(q[:, None, :], k, weight, d_amp, phase)  # (b, 1, n_distances)
        scores.append(s[:, 0])
        coss.append(torch.cos(angle[:, 0]))
    return torch.cat(scores).numpy(), torch.cat(coss).numpy()


def tapa_mc_delta(head_dim, theta, alpha, n_samples, q_mean, k_mean, std, near, far, seed=0):
    """Appendix I on synthetic q, k for TAPA: score(lambda) - score(Lambda), as rope_mc_delta."""
    d_amp, _ = tapa_split(head_dim, theta)
    g = torch.Generator().manual_seed(seed)
    lam = torch.randint(near[0], near[1] + 1, (n_samples,), generator=g).double()
    Lam = torch.randint(far[0], far[1] + 1, (n_samples,), generator=g).double()

    def scores(dist):
        q, k = sample_qk(n_samples, head_dim, q_mean, k_mean, std, g)
        s, _, _ = tapa_scores(q[:, None, :], k[:, None, :], (dist ** alpha)[:, None, None], d_amp, 'quadratic')
        return s[:, 0, 0]
    return (scores(lam) - scores(Lam)).numpy()


def mean_and_stderr(samples):
    """Column means and their standard errors."""
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / math.sqrt(samples.shape[0])


def fit_loglog_slope(x, y, yerr=None):
    """Least-squares slope of log y against log x (weights 1/relative error^2 when yerr is given)."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    w = np.ones_like(lx) if yerr is None else (np.asarray(y) / np.asarray(yerr)) ** 2
    slope, _ = np.polyfit(lx, ly, 1, w=np.sqrt(w))
    return slope


# =============================================================================
# Part 3. Scores out of a trained checkpoint
#
# The attention block computes q, k, v = c_attn(x), then its encoding's attention function from
# model.PE_TABLE. A forward hook on every block.attn.c_attn catches q, k, v; running that same function
# with v = identity gives the attention probabilities, and their log the pre-softmax scores up to a
# constant per query (tests/test_viz.py checks softmax(scores) @ v against the block's real output).


def load_checkpoint(path, device='cpu'):
    """(model in eval mode, checkpoint dict) from an out_dir or a ckpt.pt path, as eval_ppl.py takes
    them. Read by runtime.py's loader, which explains a missing, truncated or mismatched file;
    only the model is needed here, so a checkpoint without optimizer state is fine."""
    try:
        dev = runtime.pick_device(device)
        path = resolve_ckpt_path(path)
        ckpt = runtime.load_checkpoint(path, required=('model', 'model_args'))
    except (FileNotFoundError, ConfigError, runtime.TrainError) as e:
        raise SystemExit(str(e)) from None
    try:
        # attn_impl='auto': a checkpoint trained with the Triton kernel must still load on a CPU (we only
        # read q, k, v out of the model, and every implementation computes the same attention)
        model = runtime.model_from_checkpoint(ckpt, attn_impl='auto')
    except runtime.TrainError as e:
        raise SystemExit(f"{path}: {e}") from None
    return model.to(dev).eval(), ckpt


@torch.no_grad()
def capture_qkv(model, idx):
    """Run the model on idx (B, T) and return, per layer, (q, k, v) each (B, H, T, D), before any
    positional encoding is applied (exactly what c_attn produced)."""
    C, H = model.config.n_embd, model.config.n_head
    captured = []

    def hook(module, inputs, output):
        B, T, _ = output.shape
        captured.append(tuple(t.reshape(B, T, H, C // H).transpose(1, 2) for t in output.split(C, dim=2)))
    handles = [block.attn.c_attn.register_forward_hook(hook) for block in model.transformer.h]
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
    return captured  # the blocks run in order, so captured[i] is layer i


def pre_softmax_scores(model, layer, q, k):
    """The (B, H, T, T) scores of one layer for queries and keys at positions 0..T-1, through the
    model's own attention function (model.PE_TABLE, the reference, whatever you changed in it): with
    v the identity, softmax(scores) @ v is the attention probabilities, and their log is the scores
    up to one constant per query, which neither a softmax nor Delta (a difference of two means of a
    query's scores) sees. In float64, so that no visible key's probability underflows. Future keys
    get 0 (a finite number for the sums over masks: causal_softmax masks them again)."""
    cfg = dataclasses.replace(model.config, attn_impl='naive')
    B, H, T, _ = q.shape
    positions = torch.arange(T, device=q.device)
    pos = Positions(q=positions, k=positions, tables=model.pe_tables(T, q.device))
    params = model.pe_params(layer)
    identity = torch.eye(T, dtype=torch.float64, device=q.device).expand(B, H, T, T)
    with torch.no_grad():
        probs = PE_TABLE[cfg.pos_encoding].attend(q.double(), k.double(), identity, pos, params, cfg)
    return probs.log().float().masked_fill(~causal_mask(T, T, q.device), 0.0)


def causal_softmax(scores):
    T = scores.size(-1)
    return scores.masked_fill(~causal_mask(T, T, scores.device), float('-inf')).softmax(-1)


def distance_matrix(T, device='cpu'):
    """m - n for query m (rows) and key n (columns)."""
    pos = torch.arange(T, device=device)
    return pos[:, None] - pos[None, :]


def delta_short_long(scores, d_short, d_long):
    """Appendix I of the paper, per (batch, head, query): mean score over the keys at distance
    1..d_short minus mean score over the keys at distance >= d_long. Only queries m >= d_long have
    far keys, so only they count. Distance 0 (the token itself) is left out: it is a content
    match with itself, not a distance effect. Returns a flat array."""
    T = scores.size(-1)
    if not 1 <= d_short < d_long < T:
        raise ValueError(f"need 1 <= d_short < d_long < seq_len, got d_short={d_short}, d_long={d_long}, seq_len={T}")
    dist = distance_matrix(T, scores.device)
    short = ((dist >= 1) & (dist <= d_short)).float()
    far_keys = (dist >= d_long).float()
    rows = slice(d_long, T)
    s = scores[..., rows, :].float()
    mean_short = (s * short[rows]).sum(-1) / short[rows].sum(-1)
    mean_long = (s * far_keys[rows]).sum(-1) / far_keys[rows].sum(-1)
    return (mean_short - mean_long).flatten().numpy()


def attention_by_distance(probs, first_query=0):
    """Attention mass by distance for the queries m >= first_query of probs (..., T, T):
    total[d] = sum over those queries (and the leading dims) of p(m, m-d), and the number of query
    rows summed. total / rows is the mean attention a query puts at distance d; it sums to 1."""
    T = probs.size(-1)
    total = np.zeros(T)
    for d in range(T):
        diag = torch.diagonal(probs, offset=-d, dim1=-2, dim2=-1)  # p(m, m-d) for m = d..T-1
        total[d] = diag[..., max(first_query - d, 0):].sum().item()
    return total, probs[..., 0, 0].numel() * (T - first_query)


def uniform_attention_by_distance(T, first_query=0):
    """attention_by_distance of a head that attends uniformly (1/(m+1) on each visible key): the
    no-preference baseline."""
    m = np.arange(T)
    return np.array([(1.0 / (m[max(d, first_query):] + 1)).sum() for d in range(T)]), T - first_query


def log_bins(T):
    """Distance bins [0], [1], [2,3], [4,7], ... covering 0..T-1."""
    bins, lo = [(0, 0)], 1
    while lo < T:
        bins.append((lo, min(2 * lo - 1, T - 1)))
        lo *= 2
    return bins


def binned_mass(total, rows, bins):
    """The mean attention mass a query puts in each distance bin (the bins' masses add up to 1)."""
    return np.array([total[lo:hi + 1].sum() for lo, hi in bins]) / rows


def load_tokens(ckpt_dict, data_dir_override, split_name):
    """The prepared token file of the checkpoint's dataset (contract format: flat uint16 .bin)."""
    train_cfg = ckpt_dict.get('config') or {}
    dataset = train_cfg.get('dataset', 'pg19')
    tokenizer = train_cfg.get('tokenizer', 'byte')
    folder = data_dir_override or os.path.join('data', dataset, tokenizer)
    path = os.path.join(folder, f'{split_name}.bin')
    if not os.path.exists(path):
        have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.bin')) if os.path.isdir(folder) else []
        if have and split_name not in ('train', 'validation', 'test'):  # a mistyped --split: name the real ones
            raise SystemExit(f"--split={split_name}: {folder} has no such split; it has {', '.join(have)}")
        from data.common import prepare_command  # the command train.py's errors name too
        raise SystemExit(f"no {split_name} tokens at {path}: prepare them with\n    "
                         f"{prepare_command(os.path.join('data', dataset, tokenizer))}\n"
                         f"or point --data_dir at a folder holding {split_name}.bin")
    return np.memmap(path, dtype=np.uint16, mode='r')


def sample_windows(tokens, n, T, seed):
    """n windows of T tokens at random offsets (the same offsets for the same seed and data)."""
    if len(tokens) < T + 1:
        raise SystemExit(f"the token file has {len(tokens)} tokens, fewer than seq_len={T}")
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(tokens) - T, size=n)
    return [torch.from_numpy(np.asarray(tokens[o:o + T], dtype=np.int64))[None] for o in offsets]


@torch.no_grad()
def checkpoint_stats(model, windows, d_short_, d_long_, first_query):
    """Over the given windows and every layer: the Delta values, the attention-by-distance totals
    of the queries m >= first_query, and the attention probabilities of the first window."""
    deltas, total, count, first_probs = [], None, 0, None
    for i, idx in enumerate(windows):
        for layer, (q, k, v) in enumerate(capture_qkv(model, idx.to(next(model.parameters()).device))):
            scores = pre_softmax_scores(model, layer, q, k).cpu()
            deltas.append(delta_short_long(scores, d_short_, d_long_))
            probs = causal_softmax(scores)
            t, c = attention_by_distance(probs, first_query)
            total, count = (t if total is None else total + t), count + c
            if i == 0:
                first_probs = (first_probs or []) + [probs[0]]
    return np.concatenate(deltas), total, count, first_probs


# =============================================================================
# Part 4. The figures


def parse_list(text, cast=float):
    return [cast(x) for x in str(text).split(',') if x.strip()]


def parse_tapa_settings(text):
    """--tapa_settings '1.0:0.75,0.5:0.5' -> [(1.0, 0.75), (0.5, 0.5)]: (alpha, theta) pairs."""
    return [tuple(float(v) for v in pair.split(':')) for pair in str(text).split(',') if pair]


def distance_grid(max_distance, per_decade=400):
    """Every integer up to 1000, then log-spaced: enough points to draw RoPE's fast oscillations."""
    dense = np.arange(1, min(1000, max_distance) + 1)
    sparse = np.unique(np.round(np.logspace(3, math.log10(max_distance), int(per_decade * (math.log10(max_distance) - 3)) + 2)))
    return np.unique(np.concatenate([dense, sparse[sparse > 1000]])).astype(np.float64)


def plot_rope_bias(cfg, path):
    plt = get_pyplot()
    D, a, b, s = cfg['head_dim'], cfg['q_mean'], cfg['k_mean'], cfg['qk_std']
    mu0, nu0 = pair_means_to_mu_nu((a, a), (b, b))
    bases = parse_list(cfg['rope_bases'])
    nr, fr = parse_list(cfg['near'], int), parse_list(cfg['far'], int)
    grid = distance_grid(10 ** 6)
    mc_dist = np.array([1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ['C0', 'C1', 'C2', 'C3', 'C4']
    for i, base in enumerate(bases):
        curve = rope_expected_score(grid, D, base, mu0, nu0)
        near_mean = rope_expected_score(np.arange(nr[0], nr[1] + 1), D, base, mu0, nu0).mean()
        far_mean = rope_expected_score(np.arange(fr[0], fr[1] + 1), D, base, mu0, nu0).mean()
        ax1.plot(grid, curve, color=colors[i], lw=0.6, alpha=0.8,
                 label=f"base {base:.0e}: near {near_mean:.2f}, far {far_mean:.2f}")
        mean, se = mean_and_stderr(rope_mc_scores(mc_dist, D, base, cfg['mc_samples'], a, k_mean=b, std=s, seed=cfg['seed'] + i))
        ax1.errorbar(mc_dist, mean, yerr=2 * se, fmt='o', ms=3, color=colors[i], capsize=2)
        delta = rope_mc_delta(D, base, cfg['mc_samples'], a, b, s, nr, fr, seed=cfg['seed'] + 10 + i)
        ax2.hist(delta, bins=60, histtype='step', color=colors[i], density=True,
                 label=f"RoPE base {base:.0e}: mean {delta.mean():.2f}, std {delta.std():.2f}")
        ax2.axvline(delta.mean(), color=colors[i], ls='--', lw=1)
    tapa_curve, _ = tapa_expected_score(grid, D, cfg['tapa_theta'], cfg['tapa_alpha'], a, b, s)
    ax1.plot(grid, tapa_curve, color='k', lw=1.2, label=f"TAPA (alpha={cfg['tapa_alpha']}, theta={cfg['tapa_theta']})")
    ax1.axvspan(max(nr[0], 1), nr[1], color='0.85', zorder=0)
    ax1.axvspan(fr[0], fr[1], color='0.85', zorder=0)
    ax1.axhline(0, color='0.5', lw=0.5)
    ax1.set_xscale('log')
    ax1.set_xlabel('distance m - n')
    ax1.set_ylabel('expected pre-softmax score')
    ax1.set_title(f"E[score] under Assumption 2.1 (D={D}, mu0={mu0:g}, nu0={nu0:g})\n"
                  f"lines: closed form; dots: Monte Carlo +-2 s.e. ({cfg['mc_samples']} samples)", fontsize=9)
    ax1.legend(fontsize=7.5, loc='upper right')
    ax2.set_xlabel(f"Delta = score(near {nr[0]}..{nr[1]}) - score(far {fr[0]}..{fr[1]})")
    ax2.set_ylabel('density')
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.25)  # room for the legend
    ax2.set_title(f"near-vs-far gap for random q, k (q_i~N({a:g},{s:g}^2), k_i~N({b:g},{s:g}^2))\n"
                  "a shift to the right = a built-in preference for near keys", fontsize=9)
    ax2.axvline(0, color='0.5', lw=0.5)
    ax2.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def plot_tapa_decay(cfg, path):
    plt = get_pyplot()
    from matplotlib.lines import Line2D
    a, b, s = cfg['q_mean'], cfg['k_mean'], cfg['qk_std']
    Ds = cfg['tapa_small_head_dim']
    settings = parse_tapa_settings(cfg['tapa_settings'])
    grid = np.logspace(0, 6, 300)
    mc_dist = np.unique(np.round(np.logspace(0, 6, 13))).astype(np.int64)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13.5, 4.4))
    for i, (alpha, theta) in enumerate(settings):
        color = f'C{i}'
        rate = tapa_decay_exponent(alpha, theta, Ds)
        factor = tapa_phase_factor(grid, Ds, theta, alpha, a, b, s)
        ax1.loglog(grid, np.abs(factor), color=color, lw=1.3,
                   label=f"alpha={alpha:g}, theta={theta:g}: slope {-rate:g}")
        # the predicted power law, pinned to the closed form at the far end
        ax1.loglog(grid, abs(factor[-1]) * (grid / grid[-1]) ** (-rate), color=color, ls=':', lw=1)
        scores, coss = tapa_mc_scores(mc_dist, Ds, theta, alpha, cfg['tapa_mc_samples'], a, b, s, seed=cfg['seed'] + i)
        mean, se = mean_and_stderr(coss)
        ok = mean > 2 * se  # resolved by the samples; otherwise only an upper bound is known
        ax1.errorbar(mc_dist[ok], mean[ok], yerr=2 * se[ok], fmt='o', ms=3, color=color, capsize=2)
        ax1.plot(mc_dist[~ok], (np.abs(mean) + 2 * se)[~ok], 'v', ms=4, color=color, alpha=0.5)
        _, var = tapa_expected_score(grid, Ds, theta, alpha, a, b, s)
        ax2.semilogx(grid, var, color=color, lw=1.3)
        ax2.semilogx(mc_dist, scores.var(0, ddof=1), 'o', ms=3, color=color)
    D, alpha0, theta0 = cfg['head_dim'], cfg['tapa_alpha'], cfg['tapa_theta']
    var_bound = (a * a + s * s) * (b * b + s * s) / 2
    ax2.axhline(var_bound, color='k', ls='--', lw=1)
    ax2.set_ylim(0, None)
    big = abs(tapa_phase_factor([1], D, theta0, alpha0, a, b, s)[0])
    # the legends go under the panels, never over the data; what the line styles mean is in them, so
    # that each title fits on two lines. The q, k here are Eq. 12's with the phase scale 1 (a scale
    # g < 1, as the small-model setting uses, is the same as q_P shrunk by g: a slower decay).
    key = [Line2D([], [], color='k', lw=1.3, label='closed form'),
           Line2D([], [], color='k', ls=':', lw=1, label='power law |m-n|^(-alpha(1-theta)D)'),
           Line2D([], [], color='k', marker='o', ms=3, ls='none', label='Monte Carlo of E[cos], +-2 s.e.'),
           Line2D([], [], color='k', marker='v', ms=4, ls='none', alpha=0.5, label='Monte Carlo: under its noise')]
    ax1.set_xlabel('distance |m - n|')
    ax1.set_ylabel('E[score(m,n)] / E[score(m,m)]')
    ax1.set_title(f"TAPA: E[score] decays like |m-n|^(-alpha(1-theta)D)\n"
                  f"random q, k, head dim D={Ds}, phase scale 1", fontsize=9)
    ax1.text(0.03, 0.03, f"D={D}, alpha={alpha0:g}, theta={theta0:g}:\n{big:.0e} already at distance 1",
             transform=ax1.transAxes, fontsize=7.5, va='bottom')
    ax1.legend(handles=ax1.get_legend_handles_labels()[0] + key, fontsize=7.5, ncol=2, loc='upper center',
               bbox_to_anchor=(0.5, -0.16), title='colour: alpha, theta (phase scale 1)', title_fontsize=7.5)
    ax2.set_xlabel('distance |m - n|')
    ax2.set_ylabel('Var[score(m,n)]')
    ax2.set_title(f"...while one score's variance stays\nabove sigma0^2 / 2 (D={Ds}, colours as left)", fontsize=9)
    ax2.legend(handles=[Line2D([], [], color='k', lw=1.3, label='closed form'),
                        Line2D([], [], color='k', marker='o', ms=3, ls='none', label='Monte Carlo'),
                        Line2D([], [], color='k', ls='--', lw=1, label='sigma0^2 / 2 (Theorem 3.3)')],
               fontsize=7.5, loc='upper center', bbox_to_anchor=(0.5, -0.16))
    nr, fr = parse_list(cfg['near'], int), parse_list(cfg['far'], int)
    n = cfg['mc_samples']
    d_rope = rope_mc_delta(D, parse_list(cfg['rope_bases'])[0], n, a, b, s, nr, fr, seed=cfg['seed'] + 20)
    d_tapa = tapa_mc_delta(D, theta0, alpha0, n, a, b, s, nr, fr, seed=cfg['seed'] + 21)
    for delta, color, name in ((d_rope, 'C0', f"RoPE base {parse_list(cfg['rope_bases'])[0]:.0e}"),
                               (d_tapa, 'k', f"TAPA alpha={alpha0:g}, theta={theta0:g}, phase scale 1")):
        ax3.hist(delta, bins=60, histtype='step', color=color, density=True,
                 label=f"{name}: mean {delta.mean():.2f}, std {delta.std():.2f}")
        ax3.axvline(delta.mean(), color=color, ls='--', lw=1)
    ax3.axvline(0, color='0.5', lw=0.5)
    ax3.set_xlabel(f"Delta = score(near {nr[0]}..{nr[1]}) - score(far {fr[0]}..{fr[1]})")
    ax3.set_ylabel('density')
    ax3.set_title(f"the paper's Appendix I on random q, k (D={D}):\nRoPE's Delta is shifted, TAPA's is centred at 0", fontsize=9)
    ax3.legend(fontsize=7.5, loc='upper center', bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'], bbox_inches='tight')  # 'tight': the legends under the panels included
    plt.close(fig)


def plot_rope_scaling(cfg, path):
    """Wavelength 2*pi/w_d of every rotated pair under each member of the RoPE family."""
    plt = get_pyplot()
    D, T0, factor = cfg['head_dim'], 1024, 4.0
    variants = [
        ('RoPE, base 1e4', dict(base=1e4)),
        ('ABF, base 5e5', dict(base=5e5)),
        (f'PI, s={factor:g}', dict(base=1e4, scaling='pi', factor=factor)),
        (f'NTK, s={factor:g}', dict(base=1e4, scaling='ntk', factor=factor)),
        (f'dynamic NTK, s=1 at T={2 * T0}', dict(base=1e4, scaling='dynamic_ntk', factor=1.0,
                                                   original_block_size=T0, seq_len=2 * T0)),
        (f'YaRN, s={factor:g}', dict(base=1e4, scaling='yarn', factor=factor, original_block_size=T0)),
    ]
    pairs = np.arange(D // 2)
    base_freq, _ = rope_frequencies(D, 1e4)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, kw) in enumerate(variants):
        inv_freq, scale = rope_frequencies(D, **kw)
        extra = f" (q.k x {scale ** 2:.2f})" if scale != 1.0 else ''
        ax1.semilogy(pairs, 2 * math.pi / inv_freq.numpy(), '.-', ms=3, color=f'C{i}', label=name + extra)
        ax2.semilogy(pairs, (base_freq / inv_freq).numpy(), '.-', ms=3, color=f'C{i}', label=name)
    ax1.axhline(T0, color='k', ls='--', lw=1, label=f'training context {T0}')
    ax1.axhline(factor * T0, color='k', ls=':', lw=1, label=f'target context {factor * T0:g}')
    ax1.set_xlabel('rotated pair d (dims 2d, 2d+1)')
    ax1.set_ylabel('wavelength 2*pi / w_d (tokens)')
    ax1.set_title(f'RoPE family, D={D}: the wavelength of every pair\n'
                  'pairs whose wavelength exceeds the training context never saw a full turn', fontsize=9)
    ax1.legend(fontsize=7.5)
    ax2.set_xlabel('rotated pair d')
    ax2.set_ylabel('slow-down w_d(base 1e4) / w_d(variant)')
    ax2.set_title('how much each method slows each pair down\n'
                  '(PI: all by s; NTK: mostly the slow pairs; YaRN: a ramp from 1 to s)', fontsize=9)
    ax2.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def plot_alibi(cfg, path):
    plt = get_pyplot()
    H, T = 8, 256
    slopes = alibi_slopes(H)
    bias = alibi_bias(slopes, 1, T, 'cpu')[:, 0, :].flip(-1)  # (H, T): index = distance 0..T-1
    dist = np.arange(T)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.0))
    for h in range(H):
        weights = torch.softmax(bias[h], dim=-1)  # all content scores equal: position alone decides
        ax1.plot(dist, bias[h].numpy(), color=f'C{h}', lw=1, label=f'head {h}: slope {slopes[h]:.3g}')
        ax2.semilogy(dist, weights.numpy(), color=f'C{h}', lw=1)
    ax2.axhline(1 / T, color='k', ls='--', lw=1, label=f'uniform (1/{T})')
    ax1.set_xlabel('distance m - n')
    ax1.set_ylabel('bias added to the score')
    ax1.set_title(f'ALiBi: -slope_h * (m - n), {H} heads', fontsize=9)
    ax1.legend(fontsize=7.5, ncol=2)
    ax2.set_xlabel('distance m - n')
    ax2.set_ylabel('attention weight')
    ax2.set_title(f'softmax over {T} keys with equal content scores:\nsteep heads look local, shallow heads look far', fontsize=9)
    ax2.set_ylim(1e-8, 1.5)
    ax2.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def plot_nope(cfg, path):
    """With q = k = 0 every score is 0: a NoPE head then averages the values it can see. The causal
    mask alone makes the output depend on the position: the average of m+1 random values has
    norm ~ sqrt(D / (m+1)), so later layers can read the position off it."""
    plt = get_pyplot()
    T, D, n = 64, 16, 2000
    g = torch.Generator().manual_seed(cfg['seed'])
    v = torch.randn(n, 1, T, D, generator=g)
    zeros = torch.zeros(n, 1, T, D)
    y = dot_product_attention(zeros, zeros, v)  # the model's attention (the reference), no positions at all
    att = causal_softmax(torch.zeros(T, T))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.0))
    from matplotlib.colors import LogNorm
    masked = np.ma.masked_where(np.triu(np.ones((T, T), dtype=bool), 1), att.numpy())
    im = ax1.imshow(masked, cmap='viridis', norm=LogNorm(vmin=1.0 / T, vmax=1), interpolation='nearest')
    fig.colorbar(im, ax=ax1, fraction=0.046, label='attention weight (log)')
    ax1.set_xlabel('key n')
    ax1.set_ylabel('query m')
    ax1.set_title('NoPE, equal scores: weight 1/(m+1) on every visible key', fontsize=9)
    m = np.arange(T)
    ax2.plot(m, y.norm(dim=-1).mean(0)[0].numpy(), 'o', ms=3, label='|output| (mean over random values)')
    ax2.plot(m, np.sqrt(D / (m + 1)), 'k-', lw=1, label='~ sqrt(D / (m+1))')
    ax2.set_xlabel('query position m')
    ax2.set_ylabel('norm of the attention output')
    ax2.set_title('the causal mask leaks position: the output shrinks with m', fontsize=9)
    ax2.legend(fontsize=9)
    fig.tight_layout(w_pad=3)  # keep the colorbar's label clear of the right panel
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def plot_sinusoidal(cfg, path):
    """The table PE(m, d) of model.sinusoidal_embedding, and PE(m).PE(n) against m - n for several m:
    the curves coincide, the dot product depends on the distance only."""
    plt = get_pyplot()
    C, T = 128, 512
    pe = lambda pos: sinusoidal_embedding(None, Positions(q=pos, k=pos), SimpleNamespace(n_embd=C)) / 0.02
    table = pe(torch.arange(T))  # (T, C), in units of the 0.02 it is scaled by
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.0))
    im = ax1.imshow(table.numpy(), aspect='auto', cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
    fig.colorbar(im, ax=ax1, fraction=0.046, label='PE(m, d) / 0.02')
    ax1.set_xlabel('dimension d (2i: sin, 2i+1: cos)')
    ax1.set_ylabel('position m')
    ax1.set_title(f'sinusoidal table, d = {C}: fast dims on the left, slow on the right', fontsize=9)
    lam = np.arange(0, 257)
    for j, n in enumerate((0, 200, 1000, 5000)):
        dots = (pe(torch.tensor([n]))[0] * pe(torch.from_numpy(n + lam))).sum(-1)
        ax2.plot(lam, dots.numpy(), color=f'C{j}', lw=3.5 - j, ls=('-', '--', '-.', ':')[j], label=f'n = {n}')
    ax2.set_xlabel('distance m - n')
    ax2.set_ylabel('PE(m) . PE(n) / 0.02^2')
    ax2.set_title('the dot product of two positions: the same curve\nfor every n, a function of m - n only',
                  fontsize=9)
    ax2.legend(fontsize=7.5, loc='upper right')
    fig.tight_layout(w_pad=3)
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def plot_t5_buckets(cfg, path):
    """model.t5_bucket for every distance 0..1024: exact to 15, log-spaced to 128, one bucket beyond."""
    plt = get_pyplot()
    d = torch.arange(0, 1025)
    b = t5_bucket(d).numpy()
    last = int(d[b == b.max()].min())  # the first distance of the shared last bucket
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.0))
    for ax, xmax in ((ax1, 1024), (ax2, 140)):
        ax.step(d.numpy()[:xmax + 1], b[:xmax + 1], where='post', color='C0', lw=1.2, label='t5_bucket(m - n)')
        ax.axvline(16, color='C1', ls='--', lw=1, label='16: exact below, log-spaced above')
        ax.axvline(128, color='C2', ls=':', lw=1.2, label='max_distance = 128')
        ax.set_xlabel('distance m - n')
        ax.set_ylabel('bucket (row of the bias table)')
        ax.set_xlim(0, xmax)
        ax.legend(fontsize=7.5, loc='lower right')
    ax1.set_title(f'T5: 32 buckets for distances 0..1024; bucket {b.max()} holds\n'
                  f'every distance from {last} on', fontsize=9)
    ax2.set_title('distances 0..140: one bucket each up to 15,\nthen wider and wider', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def plot_kerple_bias(cfg, path):
    """Kerple's log bias -r1 log(1 + r2 d) through model.attend_kerple's parameters, next to ALiBi's lines."""
    plt = get_pyplot()
    T = 512
    pairs = ((0.5, 0.1), (1.0, 0.1), (1.0, 1.0), (2.0, 0.5))
    params = KerpleParams(SimpleNamespace(n_head=len(pairs)))
    with torch.no_grad():  # set r1, r2 exactly: raw = softplus^-1(r)
        for raw, values in ((params.raw_r1, [p[0] for p in pairs]), (params.raw_r2, [p[1] for p in pairs])):
            r = torch.tensor(values)
            raw.copy_(r + torch.log(-torch.expm1(-r)))
    r1, r2 = F.softplus(params.raw_r1).detach(), F.softplus(params.raw_r2).detach()
    dist = torch.arange(T).float()
    kerple = -r1[:, None] * torch.log1p(r2[:, None] * dist)  # the expression of attend_kerple
    alibi = alibi_bias(alibi_slopes(4), 1, T, 'cpu')[:, 0, :].flip(-1)  # (4, T): index = distance
    fig, ax = plt.subplots(figsize=(8, 4.0))
    for h, (a, b) in enumerate(pairs):
        ax.plot(dist, kerple[h].numpy(), color=f'C{h}', lw=1.5, label=f'Kerple r1={a:g}, r2={b:g}')
    for h in range(4):
        ax.plot(dist, alibi[h].numpy(), color='gray', lw=1, ls='--',
                label='ALiBi, slopes 1/4 .. 1/256 (4 heads)' if h == 0 else None)
    ax.set_ylim(-16, 0.5)
    ax.set_xlabel('distance m - n')
    ax.set_ylabel('bias added to the score')
    ax.set_title('Kerple (log): -r1 log(1 + r2 (m-n)), steep near, flat far;\nALiBi: straight lines -slope (m-n)',
                 fontsize=9)
    ax.legend(fontsize=7.5, loc='upper left', bbox_to_anchor=(1.02, 1))  # beside the axes, off the lines
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'], bbox_inches='tight')  # the legend sits outside
    plt.close(fig)


def plot_xpos_decay(cfg, path):
    """The factor zeta_i^((m-n)/XPOS_GAMMA) that xPos puts on pair i of q.k, for a D = 64 head."""
    plt = get_pyplot()
    D = 64
    dist = np.linspace(0, 16384, 400)
    zeta = (np.arange(0, D, 2) / D + 0.4) / 1.4  # as in model.attend_xpos
    fig, ax = plt.subplots(figsize=(7, 4.0))
    for j, i in enumerate((0, 8, 16, 24, 31)):
        ax.semilogy(dist, zeta[i] ** (dist / XPOS_GAMMA), color=f'C{j}', lw=1.5,
                    label=f'pair i={i}: zeta={zeta[i]:.3f}')
    ax.set_ylim(1e-18, 2)
    ax.set_xlabel('distance m - n')
    ax.set_ylabel('zeta_i^((m-n)/512), log scale')
    ax.set_title(f'xPos, D = {D}: the decay of each pair of q.k (gamma = {XPOS_GAMMA});\n'
                 'pair 0 (fastest rotation) decays the most', fontsize=9)
    ax.legend(fontsize=7.5, loc='lower left')
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def fire_params(n_head=2, block_size=128):
    """model.FIREParams of a block_size model (c = 0.1, L = L0 = block_size / 4, as a fresh layer has
    them), its MLP f set by hand instead of at random: head 0 is f(u) = u, so model.fire_bias hands
    back the MLP's input u itself; head 1 is f(u) = -12 relu(u - 1/2), a head with no penalty up to
    half of the normalized range and a steep one beyond (a window, the kind of shape f can learn)."""
    params = FIREParams(SimpleNamespace(n_head=n_head, fire_threshold=0.0, block_size=block_size))
    first, second = params.mlp[0], params.mlp[2]
    with torch.no_grad():
        for p in params.mlp.parameters():
            p.zero_()
        first.weight[0, 0], first.weight[1, 0], first.bias[1] = 1.0, 1.0, -0.5  # hidden 0: relu(u), 1: relu(u - 1/2)
        second.weight[0, 0] = 1.0      # head 0: relu(u) = u (u >= 0)
        second.weight[1, 1] = -12.0    # head 1: the window
    return params


def fire_row(params, m, head):
    """f_head(u) for the query at absolute position m against the keys 0..m, through model.fire_bias
    (one query, the last of m+1 positions); index j is the key n = j, distance m - j."""
    with torch.no_grad():
        return fire_bias(params, 1, m + 1, 'cpu')[head, 0]


def plot_fire_bias(cfg, path):
    """FIRE's normalized distance u = psi(m-n) / psi(max(L, m)) for queries at several positions m,
    before and past a 128-token training length, and what one f makes of it at three of them."""
    plt = get_pyplot()
    T = 128  # the tiny configs' block_size: L0 = 32
    params = fire_params(block_size=T)
    L, c = float(params.L_multiplier.detach() * params.L0), float(params.c.detach())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.0))
    for j, m in enumerate((7, 31, 127, 511, 2047, 8191)):
        u = fire_row(params, m, head=0).flip(-1)  # index = distance 0..m
        note = f' (< L: up to {u[m]:.2f})' if m < L else ' (past the training length)' if m >= T else ''
        # below L every query shares the denominator psi(L), so the short curves lie on each other:
        # dashed on top, and a dot where each one ends (the key n = 0)
        ax1.plot(np.arange(1, m + 1), u[1:].numpy(), color=f'C{j}', lw=1.5, ls='--' if m < L else '-',
                 zorder=3 if m < L else 2, label=f'query at m = {m}{note}')
        ax1.plot(m, u[m], 'o', color=f'C{j}', ms=4, zorder=3)
    ax1.axhline(1, color='0.5', lw=0.5)
    ax1.set_xscale('log')
    ax1.set_ylim(0, 1.08)
    ax1.set_xlabel('distance m - n (log scale)')
    ax1.set_ylabel('u, the input of the MLP f')
    ax1.set_title(f'FIRE: u = log(1 + c(m-n)) / log(1 + c max(L, m)), c = {c:g}, L = {L:g}\n'
                  'every distance lands in [0, 1] at any length (dot: the first key, n = 0)', fontsize=9)
    ax1.legend(fontsize=7.5, loc='upper left')
    for j, m in enumerate((127, 511, 2047)):
        bias = fire_row(params, m, head=1).flip(-1)
        edge = int((bias == 0).nonzero().max())  # the farthest distance with no penalty
        ax2.plot(np.arange(1, m + 1), bias[1:].numpy(), color=f'C{j + 2}', lw=1.5,
                 label=f'm = {m}: no penalty up to distance {edge}')
    ax2.set_xscale('log')
    ax2.set_xlabel('distance m - n (log scale)')
    ax2.set_ylabel('bias f(u) added to the score')
    ax2.set_title('one f, f(u) = -12 relu(u - 1/2), at three query positions:\n'
                  'the same curve of u, so its window widens with the context', fontsize=9)
    ax2.legend(fontsize=7.5, loc='lower left')
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


# CoPE's example: a query and keys made so that the gate is ~1 on a space and ~0 on any other byte.
COPE_SENTENCE = 'the cat sat on the mat and then it slept'


def cope_positions(q, k, npos=None):
    """CoPE's contextual positions p_mn = sum_{t=n..m} sigmoid(q_m.k_t / sqrt(D)), (B, H, Tq, Tk) for
    queries at the last Tq positions, 0 for future keys: model.cope_attention's logits, then its
    model.cope_positions (that function returns only the attention output). tests/test_viz.py checks
    them against it."""
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
    return model_cope_positions(att, math.inf if npos is None else npos)


def cope_example(text=COPE_SENTENCE, logit=10.0, D=4):
    """(q, k) of shape (1, 1, T, D) for the bytes of text: every q = s e_0, k = +s e_0 on a space and
    -s e_0 elsewhere, s chosen so that q.k / sqrt(D) = +-logit: gates sigmoid(+-10) = 1 - 4.5e-5 and 4.5e-5."""
    s = math.sqrt(logit * math.sqrt(D))
    is_space = torch.tensor([ch == ' ' for ch in text], dtype=torch.float64)
    q = torch.zeros(1, 1, len(text), D, dtype=torch.float64)
    q[..., 0] = s
    k = torch.zeros_like(q)
    k[..., 0] = s * (2 * is_space - 1)
    return q, k


def plot_cope_positions(cfg, path):
    """CoPE's positions p_mn on a hand-made sentence whose gates fire on spaces only, next to the
    token distance m - n + 1 a position-by-token encoding would count."""
    plt = get_pyplot()
    text = COPE_SENTENCE
    T = len(text)
    q, k = cope_example(text)
    p = cope_positions(q, k)[0, 0]  # (T, T)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={'width_ratios': [1.5, 1]})
    n = np.arange(T)
    ax1.plot(n, (T - n), 'o-', color='0.6', ms=2.5, lw=1, label='token distance m - n + 1')
    ax1.plot(n, p[-1].numpy(), 'o-', color='C3', ms=3, lw=1.5, label='CoPE position p_mn (gates summed from n to m)')
    ax1.set_xticks(n)
    ax1.set_xticklabels([ch if ch != ' ' else '_' for ch in text], fontsize=7, family='monospace')
    ax1.set_xlabel(f'key n (the query m = {T - 1} is the last byte; _ = a space)')
    ax1.set_ylabel('position of key n seen from m')
    ax1.set_title(f'CoPE, gate sigmoid(q.k / sqrt(D)) ~1 on spaces, ~0 elsewhere:\n'
                  f'the first byte, {T - 1} bytes back, is at position {p[-1, 0]:.2f}: it counts words, not bytes',
                  fontsize=9)
    ax1.legend(fontsize=7.5, loc='upper right')
    masked = np.ma.masked_where(np.triu(np.ones((T, T), dtype=bool), 1), p.numpy())
    im = ax2.imshow(masked, cmap='viridis', interpolation='nearest')
    fig.colorbar(im, ax=ax2, fraction=0.046, label='p_mn')
    ax2.set_xlabel('key n')
    ax2.set_ylabel('query m')
    ax2.set_title('p_mn for every query: constant across a word,\none step up at each space', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=cfg['dpi'])
    plt.close(fig)


def ckpt_label(path, config):
    path = os.path.abspath(path)
    name = os.path.basename(os.path.dirname(path)) if os.path.basename(path) == 'ckpt.pt' else os.path.basename(path)
    pe = config.pos_encoding
    if pe == 'tapa':  # the phase scale too: it is what tells the small-model setting from the paper's
        phase = '' if config.tapa_phase == 'quadratic' else f', {config.tapa_phase} phase'
        pe += f' (alpha={config.tapa_alpha:g}, theta={config.tapa_theta:g}{phase}, phase scale {config.tapa_phase_scale:g})'
    elif pe == 'rope':
        pe += f' (base {config.rope_base:g}' + (f', {config.rope_scaling}' if config.rope_scaling else '') + ')'
    return f'{pe} [{name}]'


def check_settings(cfg):
    """The figures' own settings, before any computation: a bad one otherwise surfaces as a traceback
    from deep inside numpy or torch, possibly after minutes of other figures."""
    def fail(key, rule):
        raise SystemExit(f"viz_bias.py: --{key}={cfg[key]} {rule}")

    def numbers(key, cast=float):
        try:
            return parse_list(cfg[key], cast)
        except ValueError:
            fail(key, f"must be comma-separated {'whole ' if cast is int else ''}numbers")
    bases = numbers('rope_bases')
    if not bases or not min(bases) > 1:
        fail('rope_bases', 'must be RoPE bases, numbers > 1 (pair i turns at base^(-2i/D) radians per token)')
    if cfg['head_dim'] < 2 or cfg['head_dim'] % 2:
        fail('head_dim', 'must be even and at least 2 (RoPE rotates pairs of dims)')
    for key in ('near', 'far'):
        window = numbers(key, int)
        if len(window) != 2 or not 0 <= window[0] < window[1]:
            fail(key, 'must be a window of distances lo,hi with 0 <= lo < hi')
    try:
        pairs = parse_tapa_settings(cfg['tapa_settings'])
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        fail('tapa_settings', 'must be alpha:theta pairs, e.g. 1.0:0.75,0.1:0.5')
    for key, D, (alpha, theta) in ([('tapa_theta', cfg['head_dim'], (cfg['tapa_alpha'], cfg['tapa_theta']))]
                                   + [('tapa_settings', cfg['tapa_small_head_dim'], p) for p in pairs]):
        if not alpha > 0:
            fail(key, f"has alpha={alpha:g}: TAPA's alpha must be > 0")
        try:
            tapa_split(D, theta)
        except ValueError as e:
            fail(key, f"does not fit: {e}")
    for key in ('mc_samples', 'tapa_mc_samples'):
        if cfg[key] < 1:
            fail(key, 'must be at least 1')
    for key in ('d_short', 'd_long', 'seq_len'):
        if cfg[key] < 0:
            fail(key, 'must be >= 0 (0: the default)')
    if cfg['d_short'] and cfg['d_long'] and not cfg['d_short'] < cfg['d_long']:
        fail('d_short', f"must be less than --d_long={cfg['d_long']} (near distances, then far ones)")
    if cfg['dpi'] < 1:
        fail('dpi', 'must be at least 1')
    if os.path.exists(cfg['out_dir']) and not os.path.isdir(cfg['out_dir']):
        fail('out_dir', 'is a file: give a folder for the figures')


def check_map_settings(cfg, path, config):
    """--map_layer and --map_head must exist in the model (negative ones count from the end)."""
    for key, n, what in (('map_layer', config.n_layer, 'layers'), ('map_head', config.n_head, 'heads')):
        if not -n <= cfg[key] < n:
            raise SystemExit(f"--{key}={cfg[key]}: {path} has {n} {what}, 0..{n - 1} (or -1 for the last)")


def plot_checkpoints(cfg, checkpoints, wanted):
    """The figures measured on trained models; checkpoints: a list of (path, model, checkpoint dict)."""
    plt = get_pyplot()
    results = []
    for path, model, ck in checkpoints:
        mc = model.config
        T = cfg['seq_len'] or mc.block_size
        if mc.pos_encoding == 'learned' and T > mc.block_size:
            print(f"note: {path}: learned positions exist only up to {mc.block_size}: seq_len {T} cut to it")
            T = mc.block_size
        ds = cfg['d_short'] or max(1, T // 16)
        dl = cfg['d_long'] or T // 2
        if not 1 <= ds < dl < T:
            raise SystemExit(f"viz_bias.py: --d_short={ds} and --d_long={dl} must be distances below the "
                             f"sequence length {T} of {path} (1 <= d_short < d_long < {T}; --seq_len sets it)")
        tokens = load_tokens(ck, cfg['data_dir'], cfg['split'])
        if int(tokens.max()) >= mc.vocab_size:
            raise SystemExit(f"{path}: token ids up to {int(tokens.max())} but the model's vocab is {mc.vocab_size}: "
                             f"--data_dir holds another tokenizer's data")
        windows = sample_windows(tokens, cfg['n_seqs'], T, cfg['seed'])
        deltas, total, count, _ = checkpoint_stats(model, windows, ds, dl, first_query=T - T // 4)
        Tm = min(cfg['map_len'], T)
        _, _, _, map_probs = checkpoint_stats(model, [windows[0][:, :Tm]], max(1, Tm // 16), Tm // 2, 0)
        results.append(dict(path=path, model=model, label=ckpt_label(path, mc), T=T, d_short=ds, d_long=dl,
                            deltas=deltas, total=total, count=count, map_probs=map_probs, map_len=Tm))
        print(f"{path}: {mc.pos_encoding}, seq_len {T}, Delta mean {deltas.mean():.3f} std {deltas.std():.3f} "
              f"over {len(deltas)} (layer, head, query) triples")
    written = []
    out = cfg['out_dir']
    if 'delta_hist' in wanted:
        fig, ax = plt.subplots(figsize=(6.5, 3.6 + 0.4 * len(results)))  # + room for the legend underneath
        for i, r in enumerate(results):
            d = r['deltas']
            ax.hist(d, bins=60, histtype='step', density=True, color=f'C{i}',
                    label=f"{r['label']}\nmean {d.mean():.2f}, std {d.std():.2f}, {100 * (d > 0).mean():.0f}% > 0")
            ax.axvline(d.mean(), color=f'C{i}', ls='--', lw=1)
        ax.axvline(0, color='0.5', lw=0.5)
        # log density: a stalled model's narrow spike at 0 would otherwise flatten everyone else's histogram
        ax.set_yscale('log')
        ax.set_ylim(1e-3, None)
        r0 = results[0]
        ax.set_xlabel(f"Delta = mean score(distance 1..{r0['d_short']}) - mean score(distance >= {r0['d_long']})")
        ax.set_ylabel('density')
        ax.set_title(f"near-vs-far score gap per layer, head and query\n"
                     f"{cfg['n_seqs']} {cfg['split']} windows of {r0['T']} tokens", fontsize=9)
        ax.legend(fontsize=7.5, loc='upper center', bbox_to_anchor=(0.5, -0.2))  # under the axes, off the data
        fig.tight_layout()
        written.append(os.path.join(out, 'delta_hist.png'))
        fig.savefig(written[-1], dpi=cfg['dpi'], bbox_inches='tight')
        plt.close(fig)
    if 'attention_vs_distance' in wanted:
        fig, ax = plt.subplots(figsize=(6.5, 4.2 + 0.2 * len(results)))  # + room for the legend underneath
        for i, r in enumerate(results):
            bins = log_bins(r['T'])
            ax.semilogy(range(len(bins)), binned_mass(r['total'], r['count'], bins), 'o-', ms=3,
                        color=f'C{i}', label=r['label'])
        T = max(r['T'] for r in results)
        bins = log_bins(T)
        ut, uc = uniform_attention_by_distance(T, T - T // 4)
        ax.semilogy(range(len(bins)), binned_mass(ut, uc, bins), 'k--', lw=1, label='uniform attention (no preference)')
        ax.set_xticks(range(len(bins)))
        ax.set_xticklabels([f'{lo}' if lo == hi else f'{lo}-{hi}' for lo, hi in bins], rotation=45, fontsize=7.5)
        ax.set_xlabel('distance m - n (log-spaced bins)')
        ax.set_ylabel('attention mass in the bin')
        ax.set_title(f"where the last quarter of the queries of each window put their attention\n"
                     f"(mean over layers, heads, queries; {cfg['n_seqs']} {cfg['split']} windows)", fontsize=9)
        ax.legend(fontsize=7.5, loc='upper center', bbox_to_anchor=(0.5, -0.42))  # under the tick labels
        fig.tight_layout()
        written.append(os.path.join(out, 'attention_vs_distance.png'))
        fig.savefig(written[-1], dpi=cfg['dpi'], bbox_inches='tight')
        plt.close(fig)
    if 'attention_maps' in wanted:
        from matplotlib.colors import LogNorm
        fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results) + 0.8, 4.3), squeeze=False,
                                 constrained_layout=True)
        for ax, r in zip(axes[0], results):
            layer = cfg['map_layer'] % len(r['map_probs'])  # in range (check_map_settings): -1 = the last
            head = cfg['map_head'] % r['map_probs'][layer].size(0)
            probs = r['map_probs'][layer][head].numpy()
            probs = np.ma.masked_where(np.triu(np.ones_like(probs, dtype=bool), 1), probs)
            im = ax.imshow(np.clip(probs, 1e-4, 1), norm=LogNorm(vmin=1e-4, vmax=1), cmap='magma', interpolation='nearest')
            name = r['label'].replace(' [', '\n[')  # settings on one line, the run's folder on the next
            ax.set_title(f"{name}, layer {layer}, head {head}", fontsize=9)
            ax.set_xlabel('key n')
            ax.set_ylabel('query m')
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label='attention weight (log)')
        written.append(os.path.join(out, 'attention_maps.png'))
        fig.savefig(written[-1], dpi=cfg['dpi'])
        plt.close(fig)
    learned = [r for r in results if r['model'].config.pos_encoding == 'learned']
    if 'learned_positions' in wanted and learned:
        fig, axes = plt.subplots(1, len(learned), figsize=(4.2 * len(learned) + 0.8, 4.3), squeeze=False,
                                 constrained_layout=True)
        for ax, r in zip(axes[0], learned):
            wpe = F.normalize(r['model'].transformer.wpe.weight.detach().float(), dim=-1)
            im = ax.imshow((wpe @ wpe.t()).numpy(), cmap='RdBu_r', vmin=-1, vmax=1)
            ax.set_title(f"{r['label']}\ncosine similarity of position embeddings", fontsize=9)
            ax.set_xlabel('position')
            ax.set_ylabel('position')
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
        written.append(os.path.join(out, 'learned_positions.png'))
        fig.savefig(written[-1], dpi=cfg['dpi'])
        plt.close(fig)
    elif 'learned_positions' in wanted and cfg['figures'] != 'all':
        print("(learned_positions: none of the checkpoints uses pos_encoding='learned')")
    return written


def parse_args(argv):
    """The settings above, overridden nanoGPT style (configurator.py): config files and --key=value.
    `--ckpt a.pt,b.pt` (a space instead of '=') is accepted too."""
    joined, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith('--') and '=' not in arg and arg != '--help' and i + 1 < len(argv) \
                and not argv[i + 1].startswith('--'):
            arg, i = f"{arg}={argv[i + 1]}", i + 1
        joined.append(arg)
        i += 1
    try:
        return {**SETTINGS, **get_overrides(SETTINGS, joined, doc=__doc__)}  # -h: usage and settings
    except ConfigError as e:
        raise SystemExit(f"viz_bias.py: {e}") from None


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    wanted = ALL_FIGURES if cfg['figures'] == 'all' else tuple(parse_list(cfg['figures'], str))
    unknown = [w for w in wanted if w not in ALL_FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from {', '.join(ALL_FIGURES)}")
    paths = parse_list(cfg['ckpt'], str)
    if cfg['figures'] != 'all' and any(w in CKPT_FIGURES for w in wanted) and not paths:
        raise SystemExit(f"{', '.join(w for w in wanted if w in CKPT_FIGURES)} need trained checkpoints: pass --ckpt=a.pt,b.pt")
    for key in ('n_seqs', 'map_len'):
        if cfg[key] < 1:
            raise SystemExit(f"--{key}={cfg[key]} must be at least 1")
    check_settings(cfg)
    get_pyplot()  # fail early, before any computation, if matplotlib is missing
    # the checkpoints too: a wrong path or setting should not wait for the theory figures
    checkpoints = []
    if paths and any(w in CKPT_FIGURES for w in wanted):
        for p in paths:
            model, ck = load_checkpoint(p, cfg['device'])
            if 'attention_maps' in wanted:
                check_map_settings(cfg, p, model.config)
            checkpoints.append((p, model, ck))
    torch.manual_seed(cfg['seed'])
    os.makedirs(cfg['out_dir'], exist_ok=True)
    written = []
    for name, fn in (('rope_bias', plot_rope_bias), ('tapa_decay', plot_tapa_decay),
                     ('rope_scaling', plot_rope_scaling), ('alibi_bias', plot_alibi), ('nope_mask', plot_nope),
                     ('sinusoidal', plot_sinusoidal), ('t5_buckets', plot_t5_buckets),
                     ('kerple_bias', plot_kerple_bias), ('fire_bias', plot_fire_bias),
                     ('xpos_decay', plot_xpos_decay), ('cope_positions', plot_cope_positions)):
        if name in wanted:
            written.append(os.path.join(cfg['out_dir'], f'{name}.png'))
            fn(cfg, written[-1])
            print(f"wrote {written[-1]}")
    if checkpoints:
        for p in plot_checkpoints(cfg, checkpoints, wanted):
            written.append(p)
            print(f"wrote {p}")
    elif not paths:
        print("(no --ckpt given: skipping the figures measured on trained models)")
    return written


if __name__ == '__main__':
    main()
