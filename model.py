"""
A GPT language model whose attention takes a pluggable positional encoding, in one file.

Read it top to bottom like a lecture: the configuration; the positional encodings (PEs), each a
short function next to its equation (absolute: learned, sinusoidal, NoPE; relative biases: ALiBi, T5,
Kerple, FIRE; rotations: RoPE and its long-context family, xPos; content-dependent: CoPE, and TAPA,
Token-Aware Phase Attention, arXiv 2509.12635 Eq. 12); PE_TABLE, all that the transformer needs of
each; the transformer, nanoGPT-shaped.

This file is the reference. Faster implementations of the same math (SDPA, a chunked and a fused
TAPA) live in fast_attention.py and tapa_triton.py and run only while the functions here that they
reproduce are unchanged: edit one of those and your edit runs (a one-line notice says so).

References: nanoGPT (github.com/karpathy/nanoGPT); RoPE: Su et al. 2021 (arXiv 2104.09864); PI:
Chen et al. 2023 (2306.15595); NTK: bloc97 2023 (reddit/LocalLLaMA); YaRN: Peng et al. 2023
(2309.00071, code jquesnelle/yarn); ABF: Xiong et al. 2023 (2309.16039); ALiBi: Press et al. 2021
(2108.12409); NoPE: Kazemnejad et al. 2023 (2305.19466); sinusoidal: Vaswani et al. 2017 (1706.03762);
T5: Raffel et al. 2020 (1910.10683); Kerple: Chi et al. 2022 (2205.09921); FIRE: Li et al. 2023
(2310.04418); xPos: Sun et al. 2022 (2212.10554); CoPE: Golovneva et al. 2024 (2405.18719); TAPA:
arXiv 2509.12635.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    block_size: int = 1024      # the context the model is trained at
    vocab_size: int = 50304     # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False          # biases in Linears and LayerNorms (GPT-2: True; a bit better and faster: False)
    pos_encoding: str = 'tapa'  # a key of PE_TABLE: tapa, rope, alibi, nope, learned, sinusoidal, t5, kerple,
                                # fire, xpos, cope
    # TAPA (Eq. 12): score = amplitude * cos(2*pi * |m-n|^alpha * phase)
    tapa_alpha: float = 0.1           # distance exponent alpha
    tapa_theta: float = 0.5           # fraction of the head dim that forms the amplitude part
    tapa_phase: str = 'quadratic'     # 'quadratic' (q_P.k_P) or 'linear' (sum q_P + sum k_P), the paper's ablation
    tapa_phase_scale: float = 1.0     # multiplies phi; 1.0 = Eq. 12 exactly. A reparametrization, see TAPA below
    # RoPE and its long-context family
    rope_base: float = 10000.0        # ABF ("adjusted base frequency") is simply a larger base
    rope_scaling: Optional[str] = None  # None or a key of ROPE_SCALINGS: 'pi', 'ntk', 'dynamic_ntk', 'yarn'
    rope_factor: float = 1.0          # s: how many times the original context we want to reach
    rope_original_block_size: Optional[int] = None  # the pretraining context (defaults to block_size)
    yarn_beta_fast: float = 32.0      # YaRN: dims that rotate more than beta_fast times keep their frequency
    yarn_beta_slow: float = 1.0       # YaRN: dims that rotate less than beta_slow times are fully interpolated
    fire_threshold: float = 0.0       # FIRE's initial threshold L (0 = block_size / 4, see FIRE below)
    cope_npos: int = 0                # CoPE's number of position embeddings (0 = block_size, see CoPE below)
    attn_impl: str = 'auto'  # 'naive' (this file), 'auto' (the fastest that reproduce it), 'chunked', 'triton'
    activation_checkpointing: bool = False  # keep only each block's input, recompute the rest in the backward


# -----------------------------------------------------------------------------
# Positional encodings, part 1: attention as usual, and the classics
#
# Every attention computes softmax_n(score(m, n)) @ v for a query at m and the keys n <= m; the PEs
# differ in how position enters score(m, n) (or the embeddings). Each has an attend(q, k, v, pos,
# params, cfg): q (B, H, Tq, D) at the LAST Tq positions (a KV cache feeds new queries against all keys
# so far), k, v (B, H, Tk, D), pos = Positions, params = its own module (PE_TABLE), cfg = GPTConfig.


class Positions(NamedTuple):  # made once per forward pass, for every layer
    q: torch.Tensor                 # (Tq,) absolute positions of the queries: past .. past+Tq-1
    k: torch.Tensor                 # (Tk,) absolute positions of the keys: 0 .. Tk-1 (cached keys carry no position)
    tables: Optional[tuple] = None  # the encoding's per-forward tables (RoPE's cos and sin)


def causal_mask(Tq, Tk, device):
    """True where query i (at absolute position Tk-Tq+i, i.e. the LAST Tq positions) may see key j.
    PyTorch's is_causal=True aligns the mask top-left, which is wrong once Tq < Tk (a KV cache)."""
    return torch.arange(Tk, device=device)[None, :] <= torch.arange(Tk - Tq, Tk, device=device)[:, None]


def distance(Tq, Tk, device):
    """m - n for the last Tq of Tk positions (queries) against all Tk (keys), (Tq, Tk); 0 for future keys."""
    return (torch.arange(Tk - Tq, Tk, device=device)[:, None] - torch.arange(Tk, device=device)[None, :]).clamp(min=0)


def dot_product_attention(q, k, v, bias=None):
    """softmax(q.k / sqrt(D) + bias, causal) @ v: the attention of NoPE, learned, RoPE (q, k rotated)
    and the additive biases, with the (Tq, Tk) scores in memory so you can read it (SDPA is the fast
    path). bias: a function (Tq, Tk) -> (H, Tq, Tk) for the last Tq of Tk positions, so that a fast
    path can make it a block of queries at a time instead of all at once."""
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if bias is not None:
        att = att + bias(Tq, Tk)
    att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # (bfloat16 q: float32)
    return F.softmax(att.to(softmax_dtype), dim=-1).to(q.dtype) @ v


def fast(reference, cfg):
    """`reference`, or a faster implementation of exactly it that fast_attention.py hands out while the
    reference is unchanged (SDPA; chunked or fused TAPA). attn_impl='naive': always the reference."""
    if cfg.attn_impl == 'naive':
        return reference
    import fast_attention  # the engine beside this file (it imports this one, hence here)
    return fast_attention.implementation(reference, cfg)


# NoPE: score = q_m.k_n / sqrt(D), no position at all: a causal mask alone lets a decoder infer them.
def attend_nope(q, k, v, pos, params, cfg):
    return fast(dot_product_attention, cfg)(q, k, v)


# Learned absolute (GPT-2): x_m = token_emb(t_m) + pos_emb(m), then NoPE's attention; none past block_size.
def learned_embedding(wpe, pos, cfg):  # (T, n_embd), added to the token embeddings
    if len(pos.k) > cfg.block_size:
        raise ValueError(f"learned position embeddings exist only for {cfg.block_size} positions, but this input "
                         f"reaches position {len(pos.k)}; use a shorter context, or another pos_encoding "
                         f"(tapa, rope, alibi, nope run at any length)")
    return wpe(pos.q)


def extend_learned(model, block_size, interpolate_learned=False):
    """New positions have no embeddings: an error, unless interpolate_learned (stretch the table linearly)."""
    cfg = model.config
    if block_size <= cfg.block_size:
        return
    if not interpolate_learned:
        raise ValueError(f"learned position embeddings cannot grow from {cfg.block_size} to {block_size} positions; "
                         f"pass interpolate_learned=True to stretch the table, or use another pos_encoding")
    old = model.transformer.wpe.weight.data  # (T_old, C) -> (T_new, C)
    new = F.interpolate(old.t()[None], size=block_size, mode='linear', align_corners=True)[0].t()
    model.transformer.wpe = nn.Embedding(block_size, cfg.n_embd).to(old.device, old.dtype)
    model.transformer.wpe.weight.data.copy_(new)


# Sinusoidal (Vaswani et al. 2017, Sec. 3.5): x_m = token_emb(t_m) + PE(m), then NoPE's attention, with
#   PE(m, 2i) = sin(m / 10000^(2i/d)),  PE(m, 2i+1) = cos(m / 10000^(2i/d)),   d = n_embd.
# Computed, not learned: it exists at every position, yet the model never saw the angles of the positions
# past block_size, which is why it does not extrapolate either. Vaswani et al. multiply the token
# embeddings by sqrt(d) (Sec. 3.4) so that tokens and positions are of one size; here the embeddings
# are GPT-2's (std 0.02, tied to the output layer), so the sinusoids are scaled down to that size instead.
def sinusoidal_embedding(params, pos, cfg):  # (T, n_embd)
    i = torch.arange(0, cfg.n_embd, 2, device=pos.q.device) / cfg.n_embd  # 2i/d
    angle = pos.q[:, None].float() / 10000.0 ** i  # (T, d/2)
    return 0.02 * torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)  # dims 2i (sin), 2i+1 (cos)


# ALiBi (Press et al. 2021, Sec. 3): score = q_m.k_n / sqrt(D) - slope_h * (m - n): a linear distance penalty.
def alibi_slopes(n_head):
    """2^(-8/n), 2^(-16/n), ... for n heads (n a power of 2); other head counts take those of the next
    lower power of 2 plus every other one of the next higher (as the authors' code does)."""
    def geometric(n):
        return [2 ** (-8.0 * (i + 1) / n) for i in range(n)]
    closest = 2 ** math.floor(math.log2(n_head))  # = n_head for a power of 2: nothing interleaved
    return torch.tensor(geometric(closest) + geometric(2 * closest)[0::2][:n_head - closest])


def alibi_bias(slopes, Tq, Tk, device):
    """(H, Tq, Tk) additive bias -slope_h * (m - n) for queries at the last Tq positions."""
    return -slopes.to(device)[:, None, None] * distance(Tq, Tk, device).float()


def attend_alibi(q, k, v, pos, params, cfg):
    return fast(dot_product_attention, cfg)(q, k, v, lambda Tq, Tk: alibi_bias(params.slopes, Tq, Tk, q.device))


class ALiBiSlopes(nn.Module):  # the fixed slopes as a buffer: they follow the model to its device, unsaved
    def __init__(self, cfg):
        super().__init__()
        self.register_buffer('slopes', alibi_slopes(cfg.n_head), persistent=False)


# T5 (Raffel et al. 2020, Sec. 2.1): score = q_m.k_n / sqrt(D) + b_h[bucket(m - n)], a learned bias per
# head and distance bucket, shared by all layers. A decoder sees m - n >= 0 only: 32 one-sided buckets,
# exact for distances 0..15, then log-spaced up to 128; farther keys share the last bucket, which is
# all a longer context needs. (Mesh TF's T5 folds 1/sqrt(D) into its init; here it stays explicit.)
def t5_bucket(distance, num_buckets=32, max_distance=128):
    exact = num_buckets // 2
    log_spaced = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    return torch.where(distance < exact, distance, log_spaced.clamp(max=num_buckets - 1))


def attend_t5(q, k, v, pos, params, cfg):
    def bias(Tq, Tk):  # (H, Tq, Tk): the learned number of each head for each distance's bucket
        return params(t5_bucket(distance(Tq, Tk, q.device))).permute(2, 0, 1)
    return fast(dot_product_attention, cfg)(q, k, v, bias)


# Kerple, log variant (Chi et al. 2022, Eq. 10): score = q_m.k_n / sqrt(D) - r1_h * log(1 + r2_h * |m - n|),
# r1, r2 > 0 learned per head and layer: ALiBi's straight line bent into a log, its slope learned. The
# authors' code clamps r1, r2 at 0.01 after each step; a softplus keeps them positive with no hook:
# r = softplus(raw), raw initialized so that r1 ~ U(0.01, 2) and r2 ~ U(0.01, 1) as in their code.
class KerpleParams(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        def inverse_softplus(r):
            return r + torch.log(-torch.expm1(-r))
        self.raw_r1 = nn.Parameter(inverse_softplus(torch.rand(cfg.n_head) * 1.99 + 0.01))
        self.raw_r2 = nn.Parameter(inverse_softplus(torch.rand(cfg.n_head) * 0.99 + 0.01))


def attend_kerple(q, k, v, pos, params, cfg):
    r1, r2 = (F.softplus(r)[:, None, None] for r in (params.raw_r1, params.raw_r2))  # (H, 1, 1)
    return fast(dot_product_attention, cfg)(q, k, v, lambda Tq, Tk: -r1 * torch.log1p(r2 * distance(Tq, Tk, q.device)))


# FIRE (Li et al. 2023, Sec. 3): the bias is a learned function of a normalized distance,
#   score = q_m.k_n / sqrt(D) + f(psi(m - n) / psi(max(L, m))),   psi(x) = log(1 + c*x),
# f an MLP 1 -> 32 -> H (ReLU), c > 0 and the threshold L learned, one of each per layer. Dividing by
# psi of the query's own (absolute) position puts every distance in [0, 1] at any length: past the
# training length f interpolates instead of extrapolating (and a KV cache stays exact: m is absolute).
# L keeps short prefixes from stretching their few distances over all of [0, 1]. As the authors'
# code: c starts at 0.1 and L = |multiplier * L0| with L0 fixed and the multiplier learned from 1; c
# is used as |c|. Their L0 = 512 is a quarter of their training length 2048: with block_size 128 it
# would never act, so L0 = fire_threshold, by default block_size / 4 (fixed when the context grows).
class FIREParams(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, cfg.n_head))
        self.c = nn.Parameter(torch.tensor(0.1))
        self.L_multiplier = nn.Parameter(torch.tensor(1.0))
        self.L0 = cfg.fire_threshold or cfg.block_size / 4


def fire_bias(params, Tq, Tk, device):
    """(H, Tq, Tk): f(psi(m - n) / psi(max(L, m))) for queries at the last Tq of Tk positions."""
    m = torch.arange(Tk - Tq, Tk, device=device).float()[:, None]  # (Tq, 1) absolute query positions
    c, L = params.c.abs(), (params.L_multiplier * params.L0).abs()
    u = torch.log1p(c * distance(Tq, Tk, device)) / (torch.log1p(c * torch.maximum(m, L)) + 1e-6)  # (Tq, Tk)
    return params.mlp(u[..., None]).permute(2, 0, 1)


def attend_fire(q, k, v, pos, params, cfg):
    return fast(dot_product_attention, cfg)(q, k, v, lambda Tq, Tk: fire_bias(params, Tq, Tk, q.device))


def check_fire(cfg):
    if not (math.isfinite(cfg.fire_threshold) and cfg.fire_threshold >= 0):
        raise ValueError(f"fire_threshold={cfg.fire_threshold!r} must be a finite number >= 0 (0 = block_size / 4)")


def extend_fire(model, block_size, **_):  # the normalization already covers any length; keep L0 as trained
    model.config.fire_threshold = model.config.fire_threshold or model.config.block_size / 4


# -----------------------------------------------------------------------------
# Positional encodings, part 2: RoPE and its long-context family
#
# RoPE (RoFormer, Sec. 3.2) rotates each pair of dims (2i, 2i+1) of q and k by the angle pos * w_i,
#     w_i = base^(-2i/D),  i = 0 .. D/2-1,
# so that q_m.k_n depends on positions only through m-n. Pair i completes a full turn every
# 2*pi/w_i tokens: high-frequency pairs (small i) encode local order, low-frequency ones (large i)
# rotate less than once over the whole training context.


def apply_rope(x, cos, sin):
    """Rotate each pair (x_2i, x_2i+1) of the last dim by its angle: x (B, H, T, D), cos/sin (T, D/2)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def attend_rope(q, k, v, pos, params, cfg):
    cos, sin = pos.tables  # (Tk, D/2) each, for positions 0..Tk-1
    q, k = apply_rope(q, cos[pos.q], sin[pos.q]), apply_rope(k, cos[pos.k], sin[pos.k])
    return fast(dot_product_attention, cfg)(q, k, v)


# Past the trained length the low-frequency pairs see angles they never saw in training, and
# perplexity explodes. The family below changes w_i: each scaling is a small function of the plain
# frequencies returning (inv_freq, attention_scale), the scale multiplying cos and sin (so q.k by its
# square); s = rope_factor, L = the pretraining context. As Hugging Face's rope utilities and YaRN's
# reference code. ABF is no function: it is a larger rope_base (5e5 instead of 1e4).

def rope_pi(inv_freq, factor, **_):
    """Position Interpolation: w_i / s for every pair, s times more positions in the trained angle range."""
    return inv_freq / factor, 1.0


def rope_ntk(inv_freq, head_dim, base, factor, **_):
    """NTK-aware: base * s^(D/(D-2)); the lowest frequency is divided by s, the highest barely moves."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim  # 2i/D
    return 1.0 / (base * factor ** (head_dim / (head_dim - 2))) ** dims, 1.0


def rope_dynamic_ntk(inv_freq, head_dim, base, factor, original, seq_len, **_):
    """NTK with s chosen from the current length, s' = s*T/L - (s-1), once T > L. With a KV cache it is
    exact in the first layer only (deeper cached keys come from hidden states of shorter lengths)."""
    if seq_len <= original:
        return inv_freq, 1.0
    return rope_ntk(inv_freq, head_dim, base, factor * seq_len / original - (factor - 1))


def rope_yarn(inv_freq, head_dim, base, factor, original, beta_fast, beta_slow, **_):
    """YaRN: interpolate (w_i/s) the pairs that turn less than beta_slow times over L, keep those that
    turn more than beta_fast times, ramp linearly between; scale q and k by 0.1*ln(s)+1 each."""
    def pair_index(num_rotations):  # the (fractional) pair whose wavelength fits num_rotations times into L
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
    # ramp = 0: keep the original frequency (extrapolate); ramp = 1: interpolate it by the factor
    return inv_freq * (1 - ramp) + (inv_freq / factor) * ramp, 0.1 * math.log(factor) + 1.0


ROPE_SCALINGS = {'pi': rope_pi, 'ntk': rope_ntk, 'dynamic_ntk': rope_dynamic_ntk, 'yarn': rope_yarn}


def rope_frequencies(head_dim, base, scaling=None, factor=1.0, original_block_size=None,
                     beta_fast=32.0, beta_slow=1.0, seq_len=None):
    """(inv_freq, attention_scale): the head_dim/2 frequencies w_i after the scaling, and its scale."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # w_i
    if scaling is None or (factor == 1.0 and scaling != 'dynamic_ntk'):
        return inv_freq.float(), 1.0
    inv_freq, attention_scale = ROPE_SCALINGS[scaling](
        inv_freq, head_dim=head_dim, base=base, factor=factor, original=original_block_size,
        beta_fast=beta_fast, beta_slow=beta_slow, seq_len=seq_len)
    return inv_freq.float(), attention_scale


@torch.compiler.disable  # a table computed once: torch 2.4's inductor fails on base ** dims (Invalid NaN comparison)
def rope_cos_sin(cfg, head_dim, seq_len, device):
    """cos and sin (seq_len, head_dim/2) of pos * w_i for pos = 0..seq_len-1, times the attention scale."""
    inv_freq, attention_scale = rope_frequencies(
        head_dim, cfg.rope_base, cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_block_size or cfg.block_size,
        cfg.yarn_beta_fast, cfg.yarn_beta_slow, seq_len)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq).to(device)
    return angles.cos() * attention_scale, angles.sin() * attention_scale


def check_rope(cfg):
    head_dim = cfg.n_embd // cfg.n_head
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dims: head dim {head_dim} must be even")
    if not cfg.rope_base > 1:
        raise ValueError(f"rope_base={cfg.rope_base!r} must be > 1 (pair i turns by base^(-2i/D) per token: only "
                         f"a base above 1 gives the slower and slower rotations RoPE relies on; 10000 is usual)")
    if cfg.rope_scaling in ('ntk', 'dynamic_ntk') and head_dim < 4:
        raise ValueError(f"rope_scaling={cfg.rope_scaling!r} rescales the base by factor^(D/(D-2)): "
                         f"it needs a head dim of at least 4, not {head_dim}")
    if cfg.rope_scaling is not None and not cfg.rope_factor >= 1.0:
        raise ValueError(f"rope_factor={cfg.rope_factor} must be >= 1 (it is the context extension factor)")
    if cfg.rope_scaling is not None and cfg.rope_original_block_size is not None and not cfg.rope_original_block_size >= 1:
        raise ValueError(f"rope_original_block_size={cfg.rope_original_block_size} must be the pretraining "
                         f"context (>= 1), or None for block_size")
    for key in ('yarn_beta_fast', 'yarn_beta_slow') if cfg.rope_scaling == 'yarn' else ():
        if not getattr(cfg, key) > 0:
            raise ValueError(f"{key}={getattr(cfg, key)!r} must be > 0 (yarn_beta_fast and yarn_beta_slow are "
                             f"thresholds in rotations over the original context; 32 and 1 are usual)")
    if cfg.rope_scaling == 'yarn' and not cfg.yarn_beta_fast > cfg.yarn_beta_slow:
        # swapped, YaRN's ramp would run backwards: the fast pairs interpolated, the slow ones kept
        raise ValueError(f"yarn_beta_fast={cfg.yarn_beta_fast} must be larger than yarn_beta_slow="
                         f"{cfg.yarn_beta_slow} (YaRN's 32 and 1)")


def extend_rope(model, block_size, **_):  # remember the pretraining context: PI, NTK, YaRN scale by it
    model.config.rope_original_block_size = model.config.rope_original_block_size or model.config.block_size


# xPos (Sun et al. 2022, Sec. 3): RoPE times an exponential decay of distance. Pair i of q_m is also
# scaled by zeta_i^(m/gamma) and of k_n by zeta_i^(-n/gamma), zeta_i = (2i/D + 0.4) / 1.4, gamma = 512,
# so that q.k gains zeta_i^((m-n)/gamma) <= 1: far keys count less, the fast-turning pairs (small i) most.
# Only m - n matters, so positions are counted from the middle of this forward's keys: at 16x the
# training length zeta^(n/gamma) alone would overflow float16 (and float32 past ~70k tokens).
XPOS_GAMMA = 512


def attend_xpos(q, k, v, pos, params, cfg):
    cos, sin = pos.tables
    D, center = q.size(-1), len(pos.k) // 2
    if q.dtype == torch.float16 and (len(pos.k) - center) / XPOS_GAMMA * math.log(1.4 / 0.4) > math.log(6e4):
        raise ValueError(f"xpos: {len(pos.k)} positions overflow float16's range in the decay: use bfloat16")
    zeta = (torch.arange(0, D, 2, device=q.device) / D + 0.4) / 1.4  # (D/2,)
    q_scale = zeta ** ((pos.q - center)[:, None] / XPOS_GAMMA)       # (Tq, D/2)
    k_scale = zeta ** (-(pos.k - center)[:, None] / XPOS_GAMMA)      # (Tk, D/2)
    q = apply_rope(q, cos[pos.q] * q_scale, sin[pos.q] * q_scale)    # (scaling cos and sin scales the pair)
    k = apply_rope(k, cos[pos.k] * k_scale, sin[pos.k] * k_scale)
    return fast(dot_product_attention, cfg)(q, k, v)


# -----------------------------------------------------------------------------
# Positional encodings, part 3: CoPE, positions counted by the context
#
# CoPE (Golovneva et al. 2024, Sec. 3): contextual positions. Query m gives each key n <= m a gate
# g_mn = sigmoid(q_m.k_n / sqrt(D)) (the authors' code gates the scaled logit; Eq. 3 writes sigmoid(q.k)),
# and counts the gates from the key to itself: p_mn = sum_{t=n..m} g_mt (Eq. 4), a position that grows
# only over the tokens the query "counts" (words, sentences, ...), not over every token. Positions are
# fractional, so the embedding is interpolated between the two integers around p (Eq. 5):
#   score = q_m.k_n / sqrt(D) + q_m.e[p_mn],   q.e[p] = (p - floor p) q.e[ceil p] + (1 - p + floor p) q.e[floor p]
# e: cope_npos learned vectors of the head dim per layer, shared by the heads, zeros at first (as the
# authors' code); positions past the last share it. cope_npos = block_size by default: p_mn <= m - n + 1,
# so at the training length no position is cut. A longer context keeps the table (finetune_long.py
# changes nothing): positions count gates, not tokens, and the rare ones past the table share its last.
def cope_positions(att, npos):
    """p_mn = sum_{t=n..m} sigmoid(att_mt) from the logits att (..., Tq, Tk), -inf for future keys (gate 0),
    at most npos - 1 (the last position embedding)."""
    gates = torch.sigmoid(att)
    return gates.flip(-1).cumsum(-1).flip(-1).clamp(max=npos - 1)  # the sum over t >= n


def cope_attention(q, k, v, pos_emb):
    """q (B, H, Tq, D) at the last Tq positions, k, v (B, H, Tk, D), pos_emb (D, npos) -> (B, H, Tq, D)."""
    Tq, Tk = q.size(-2), k.size(-2)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # (bfloat16 q: the gates' sum in float32)
    q, k = q.to(dtype), k.to(dtype)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
    p = cope_positions(att, pos_emb.size(-1))  # (B, H, Tq, Tk)
    at_integers = q @ pos_emb.to(dtype)  # (B, H, Tq, npos): q_m.e[i] for every integer position i
    lo, hi = p.floor(), p.ceil()
    w = p - lo  # the gradient reaches the gates through the interpolation weight
    pos_logit = at_integers.gather(-1, hi.long()) * w + at_integers.gather(-1, lo.long()) * (1 - w)
    return F.softmax(att + pos_logit, dim=-1).to(v.dtype) @ v


class CoPEParams(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(cfg.n_embd // cfg.n_head, cfg.cope_npos or cfg.block_size))


def attend_cope(q, k, v, pos, params, cfg):
    return fast(cope_attention, cfg)(q, k, v, params.pos_emb)


def check_cope(cfg):
    if not (isinstance(cfg.cope_npos, int) and cfg.cope_npos >= 0):
        raise ValueError(f"cope_npos={cfg.cope_npos!r} must be a whole number >= 0 (0 = block_size positions)")


def extend_cope(model, block_size, **_):  # the table stays as trained (see above); pin its size in the config
    model.config.cope_npos = model.config.cope_npos or model.config.block_size


# -----------------------------------------------------------------------------
# Positional encodings, part 4: TAPA, Token-Aware Phase Attention (arXiv 2509.12635)
#
# TAPA removes RoPE. Each head's q and k (head dim D) are split into an amplitude part (the first
# theta*D dims) and a phase part (the other (1-theta)*D dims). The score of query m and key n
# (paper Eq. 12) is
#
#     score(m, n) = q_A.k_A / sqrt(theta*D)  *  cos( 2*pi * |m-n|^alpha * phi(q, k) ),
#     phi(q, k)   = q_P.k_P / sqrt((1-theta)*D)                  ('quadratic', the paper's choice)
#                 = (sum(q_P) + sum(k_P)) / sqrt((1-theta)*D)    ('linear', the paper's ablation)
#
# then the causal mask, softmax and @ v; alpha = 0.1, theta = 0.5 by default, no new parameters.
# Why it extrapolates: the phase is a property of the *tokens* (phi) modulated by a slowly growing
# function of distance (|m-n|^0.1 only goes from 1 to 2 between 1 and 1024 tokens): no rotation
# frequencies to fall out of their trained range. Its expected long-range bias decays like
# |m-n|^(-alpha*(1-theta)*D) (Theorems 3.2-3.3) while single scores keep their variance: far tokens
# stay attendable. Two q.k products and a cos per score: SDPA cannot run it (see fast_attention.py).


def tapa_split(head_dim, theta):
    """Widths (d_A, d_P) of the amplitude and phase parts; both must be positive whole numbers."""
    d_amp = theta * head_dim
    if not (0.0 < theta < 1.0) or abs(d_amp - round(d_amp)) > 1e-6 or round(d_amp) in (0, head_dim):
        raise ValueError(f"tapa_theta={theta} with head dim {head_dim} gives an amplitude part of {d_amp:g} dims and "
                         f"a phase part of {head_dim - d_amp:g}: both must be positive whole numbers "
                         f"(e.g. theta=0.5 or 0.25 for head dim {head_dim})")
    d_amp = round(d_amp)
    return d_amp, head_dim - d_amp


def tapa_distance_weight(q_start, Tq, k_start, Tk, alpha, device):
    """|m-n|^alpha for queries at absolute positions q_start.. and keys at k_start.., shape (Tq, Tk).
    Future keys (n > m) get 0: they are masked anyway, and 0 keeps their cos finite."""
    m = torch.arange(q_start, q_start + Tq, device=device)
    n = torch.arange(k_start, k_start + Tk, device=device)
    return (m[:, None] - n[None, :]).clamp(min=0).float() ** alpha


def autocast_off(device):
    """Autocast off for this device (a no-op where torch has no autocast for it: MPS before 2.5)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return nullcontext()


def tapa_scores(q, k, weight, d_amp, phase):
    """Eq. 12's scores (no mask), amplitude and angle; q (..., Tq, D), k (..., Tk, D), weight = |m-n|^alpha.
    All in float32 (float64 for float64), dot products included, autocast or not: a bf16 angle of 30
    radians is off by a tenth of a radian, and so is one made from a bf16 q_P.k_P."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    d_phase = q.size(-1) - d_amp
    with autocast_off(q.device):
        q, k = q.to(dtype), k.to(dtype)
        q_amp, q_phase = q[..., :d_amp], q[..., d_amp:]
        k_amp, k_phase = k[..., :d_amp], k[..., d_amp:]
        amplitude = (q_amp @ k_amp.transpose(-2, -1)) / math.sqrt(d_amp)  # (B, H, Tq, Tk)
        if phase == 'quadratic':
            phi = (q_phase @ k_phase.transpose(-2, -1)) / math.sqrt(d_phase)
        else:  # 'linear'
            phi = (q_phase.sum(-1)[..., :, None] + k_phase.sum(-1)[..., None, :]) / math.sqrt(d_phase)
        angle = 2 * math.pi * weight.to(dtype) * phi
        return amplitude * torch.cos(angle), amplitude, angle


def tapa_attention(q, k, v, alpha, theta, phase='quadratic'):
    """Eq. 12 as written: the (Tq, Tk) scores, mask, softmax, @ v; the queries are the last Tq positions."""
    Tq, Tk = q.size(-2), k.size(-2)
    d_amp, _ = tapa_split(q.size(-1), theta)
    weight = tapa_distance_weight(Tk - Tq, Tq, 0, Tk, alpha, q.device)
    scores, _, _ = tapa_scores(q, k, weight, d_amp, phase)  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
    return F.softmax(scores, dim=-1).to(v.dtype) @ v


# Making TAPA learn in a small model (docs/small_scale_study.md). At GPT-2 init every angle is near 0,
# where cos is flat: the phase gets almost no gradient while Adam moves its weights by ~lr per step, so
# it grows into noise and a 4-layer model stalls near the bigram level. Two knobs tame it without
# changing what the model can express (phi -> g*phi = scaling the phase rows of the q projection):
# tapa_phase_scale = g (g < 1: the amplitude learns first) and tapa_phase_warmup_iters (train.py: g
# ramps in from ~0 to 1), applied to q_P (and k_P for 'linear') before any implementation runs.

class TAPAPhaseScale(nn.Module):
    """Multipliers of q's (and for 'linear' k's) dims: 1 on the amplitude, tapa_phase_scale * ramp on the phase."""
    def __init__(self, cfg):
        super().__init__()
        self.d_amp, _ = tapa_split(cfg.n_embd // cfg.n_head, cfg.tapa_theta)
        self.register_buffer('dim_scale', torch.ones(cfg.n_embd // cfg.n_head), persistent=False)
        self.set_factor(cfg.tapa_phase_scale)

    def set_factor(self, factor):
        self.dim_scale[self.d_amp:] = factor
        self.scaled = factor != 1.0  # a bool, not the factor: torch.compile then needn't recompile per step


def attend_tapa(q, k, v, pos, params, cfg):
    if params.scaled:  # (back to q's dtype: under autocast the float32 scale would make bf16 q float32)
        q = (q * params.dim_scale).to(q.dtype)
        k = (k * params.dim_scale).to(k.dtype) if cfg.tapa_phase == 'linear' else k
    return fast(tapa_attention, cfg)(q, k, v, cfg.tapa_alpha, cfg.tapa_theta, cfg.tapa_phase)


def check_tapa(cfg):
    tapa_split(cfg.n_embd // cfg.n_head, cfg.tapa_theta)
    if not (isinstance(cfg.tapa_alpha, (int, float)) and math.isfinite(cfg.tapa_alpha) and cfg.tapa_alpha > 0):
        raise ValueError(f"tapa_alpha={cfg.tapa_alpha!r} must be a finite number > 0 (|m-n|^alpha with alpha <= 0 "
                         f"carries no distance information, or divides by zero at m = n)")
    if cfg.tapa_phase not in ('quadratic', 'linear'):
        raise ValueError(f"tapa_phase={cfg.tapa_phase!r} must be 'quadratic' or 'linear'")
    if not (math.isfinite(cfg.tapa_phase_scale) and cfg.tapa_phase_scale > 0):
        raise ValueError(f"tapa_phase_scale={cfg.tapa_phase_scale!r} must be a finite number > 0")


# -----------------------------------------------------------------------------
# The table: all that the transformer needs of a positional encoding. A new one is its functions plus an entry.


@dataclass
class PositionalEncoding:
    attend: Callable                   # attend(q, k, v, pos, params, cfg) -> (B, H, Tq, D)
    params: Optional[Callable] = None  # params(cfg) -> nn.Module of the encoding's own weights or buffers
    shared: bool = True                # one params module for the whole model (transformer.wpe), or one per layer
    embed: Optional[Callable] = None   # embed(params, pos, cfg) -> (T, n_embd), added to the token embeddings
    tables: Optional[Callable] = None  # tables(cfg, head_dim, seq_len, device): shared by every layer (cached)
    check: Optional[Callable] = None   # check(cfg): raise ValueError on settings that cannot work
    extend: Optional[Callable] = None  # extend(model, block_size, **options): before the context grows


PE_TABLE = {  # TAPA first: the method this codebase is about
    'tapa': PositionalEncoding(attend_tapa, params=TAPAPhaseScale, check=check_tapa),
    'rope': PositionalEncoding(attend_rope, tables=rope_cos_sin, check=check_rope, extend=extend_rope),
    'alibi': PositionalEncoding(attend_alibi, params=ALiBiSlopes),
    'nope': PositionalEncoding(attend_nope),
    'learned': PositionalEncoding(attend_nope, params=lambda cfg: nn.Embedding(cfg.block_size, cfg.n_embd),
                                  embed=learned_embedding, extend=extend_learned),
    'sinusoidal': PositionalEncoding(attend_nope, embed=sinusoidal_embedding),
    't5': PositionalEncoding(attend_t5, params=lambda cfg: nn.Embedding(32, cfg.n_head)),
    'kerple': PositionalEncoding(attend_kerple, params=KerpleParams, shared=False),
    'fire': PositionalEncoding(attend_fire, params=FIREParams, shared=False, check=check_fire,
                                extend=extend_fire),
    'xpos': PositionalEncoding(attend_xpos, tables=rope_cos_sin, check=check_rope, extend=extend_rope),
    'cope': PositionalEncoding(attend_cope, params=CoPEParams, shared=False, check=check_cope,
                                extend=extend_cope),
}


def check_config(cfg):
    """The one validator of model settings: fail early, with a message that says what to change."""
    for key, allowed in (('pos_encoding', tuple(PE_TABLE)), ('rope_scaling', (None, *ROPE_SCALINGS)),
                         ('attn_impl', ('auto', 'naive', 'chunked', 'triton'))):
        if getattr(cfg, key) not in allowed:  # (rope_scaling whatever the PE: a typo is a typo)
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not one of {allowed}")
    for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} is too small (it must be at least 1)")
    if cfg.n_embd % cfg.n_head != 0:
        raise ValueError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout={cfg.dropout!r} must be within [0, 1) (the probability of zeroing an activation)")
    if PE_TABLE[cfg.pos_encoding].check:  # the encoding's own settings
        PE_TABLE[cfg.pos_encoding].check(cfg)


# -----------------------------------------------------------------------------
# The transformer


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.config = config
        pe = PE_TABLE[config.pos_encoding]
        self.pe = pe.params(config) if pe.params and not pe.shared else None  # per-layer PE weights, if any

    def forward(self, x, pos, shared_pe=None, cache=None):
        B, T, C = x.size()
        H = self.config.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:  # keys are cached before any position is applied to them (see Positions)
            if 'k' in cache:
                k, v = torch.cat((cache['k'], k), dim=2), torch.cat((cache['v'], v), dim=2)
            cache['k'], cache['v'] = k, v
        params = self.pe if self.pe is not None else shared_pe  # where the PE enters the attention:
        y = PE_TABLE[self.config.pos_encoding].attend(q, k, v, pos, params, self.config)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, pos, shared_pe=None, cache=None):
        x = x + self.attn(self.ln_1(x), pos, shared_pe, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        pe = PE_TABLE[config.pos_encoding]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if pe.params and pe.shared:  # the encoding's weights shared by all layers (GPT-2's position embeddings)
            self.transformer.wpe = pe.params(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix in and out
        # GPT-2 init: N(0, 0.02); residual projections / sqrt(2 * n_layer), so the residual stream's variance stays put
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self._tables = (None, None)  # (key, tables): the last per-forward tables, see pe_tables

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):  # by default without position embeddings (tokens' count: tied)
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and PE_TABLE[self.config.pos_encoding].embed and 'wpe' in self.transformer:
            n_params -= sum(p.numel() for p in self.transformer.wpe.parameters())
        return n_params

    def pe_params(self, layer):  # the encoding's module for this layer: its own, or the model-wide one
        own = self.transformer.h[layer].attn.pe
        return own if own is not None else self.transformer.wpe if 'wpe' in self.transformer else None

    def pe_tables(self, seq_len, device):
        """The encoding's tables for positions 0..seq_len-1 (RoPE: cos and sin), or None; made for a
        power-of-two length (dynamic NTK: the length itself), rebuilt when that, device or config change."""
        cfg = self.config
        make = PE_TABLE[cfg.pos_encoding].tables
        if make is None:
            return None
        n = seq_len if cfg.rope_scaling == 'dynamic_ntk' else max(cfg.block_size, 1 << (seq_len - 1).bit_length())
        key = (n, str(device), tuple(vars(cfg).values()))
        if self._tables[0] != key:
            # normal tensors even under inference_mode: a later training step saves them for its backward
            with torch.inference_mode(False):
                self._tables = (key, make(cfg, cfg.n_embd // cfg.n_head, n, device))
        return tuple(t[:seq_len] for t in self._tables[1])

    def hidden(self, idx, kv_cache=None):
        """The final hidden states (B, T, n_embd) of tokens idx (B, T), after those in kv_cache if given."""
        B, T = idx.size()
        past = kv_cache[0]['k'].size(2) if kv_cache is not None and 'k' in kv_cache[0] else 0
        pe = PE_TABLE[self.config.pos_encoding]
        shared_pe = self.transformer.wpe if 'wpe' in self.transformer else None
        k_pos = torch.arange(past + T, device=idx.device)
        pos = Positions(q=k_pos[past:], k=k_pos, tables=self.pe_tables(past + T, idx.device))
        x = self.transformer.wte(idx) + (pe.embed(shared_pe, pos, self.config) if pe.embed else 0)  # (B, T, n_embd)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.config.activation_checkpointing and self.training and kv_cache is None:  # memory for time
                x = torch.utils.checkpoint.checkpoint(block, x, pos, shared_pe, use_reentrant=False)
            else:
                x = block(x, pos, shared_pe, kv_cache[i] if kv_cache is not None else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None):
        """Every PE but 'learned' takes inputs longer than block_size: what eval_ppl.py measures."""
        x = self.hidden(idx, kv_cache)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:  # inference: only the last position's logits are needed
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def set_tapa_phase_ramp(self, ramp):
        """TAPA's phi times tapa_phase_scale * ramp (train.py's tapa_phase_warmup_iters; 1 after it)."""
        for module in self.modules():  # the shared one, or one per layer in a variant's table entry
            if isinstance(module, TAPAPhaseScale):
                module.set_factor(self.config.tapa_phase_scale * ramp)

    def new_kv_cache(self):  # one dict per layer, filled with the keys and values seen so far
        return [{} for _ in range(self.config.n_layer)]
