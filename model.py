"""
A GPT language model whose attention takes a pluggable positional encoding, in one file.

Read it top to bottom like a lecture:
  1. the positional encodings, each next to its equation:
       learned absolute embeddings (GPT-2), ALiBi, NoPE, RoPE and its long-context family
       (Position Interpolation, NTK-aware, dynamic NTK, YaRN, and ABF = a larger base), and
       TAPA, Token-Aware Phase Attention (arXiv 2509.12635, Eq. 12), with an exact
       memory-efficient version of it,
  2. the transformer (attention block, MLP, GPT), nanoGPT-shaped, where the attention block
     picks one of them from a single config field, `pos_encoding`.

References:
  GPT-2 / nanoGPT: https://github.com/karpathy/nanoGPT
  RoPE:  Su et al. 2021, "RoFormer" (arXiv 2104.09864)
  PI:    Chen et al. 2023, "Extending Context Window ... via Positional Interpolation" (2306.15595)
  NTK:   bloc97 2023, "NTK-Aware Scaled RoPE" (reddit/LocalLLaMA) and its dynamic variant
  YaRN:  Peng et al. 2023 (arXiv 2309.00071), reference code jquesnelle/yarn
  ABF:   Xiong et al. 2023, "Effective Long-Context Scaling" (2309.16039): base 1e4 -> 5e5
  ALiBi: Press et al. 2021, "Train Short, Test Long" (2108.12409)
  NoPE:  Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization"
  TAPA:  "Positional Encoding via Token-Aware Phase Attention" (arXiv 2509.12635)
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
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
    # which positional encoding the attention uses: 'tapa', 'rope', 'alibi', 'nope' or 'learned'
    pos_encoding: str = 'tapa'
    # TAPA (Eq. 12): score = amplitude * cos(2*pi * |m-n|^alpha * phase)
    tapa_alpha: float = 0.1           # distance exponent alpha
    tapa_theta: float = 0.5           # fraction of the head dim that forms the amplitude part
    tapa_phase: str = 'quadratic'     # 'quadratic' (q_P.k_P) or 'linear' (sum q_P + sum k_P), the paper's ablation
    tapa_phase_scale: float = 1.0     # multiplies phi; 1.0 = Eq. 12 exactly. A reparametrization, see TAPA below
    # RoPE and its long-context family
    rope_base: float = 10000.0        # ABF ("adjusted base frequency") is simply a larger base
    rope_scaling: Optional[str] = None  # None, 'pi', 'ntk', 'dynamic_ntk' or 'yarn'
    rope_factor: float = 1.0          # s: how many times the original context we want to reach
    rope_original_block_size: Optional[int] = None  # the pretraining context (defaults to block_size)
    yarn_beta_fast: float = 32.0      # YaRN: dims that rotate more than beta_fast times keep their frequency
    yarn_beta_slow: float = 1.0       # YaRN: dims that rotate less than beta_slow times are fully interpolated
    # how attention is computed: 'naive' (materialized, the readable reference), 'chunked' (exact,
    # memory linear in T, TAPA only), 'triton' (fused CUDA kernel, TAPA only), 'auto' (best available)
    attn_impl: str = 'auto'


POS_ENCODINGS = ('tapa', 'rope', 'alibi', 'nope', 'learned')
ROPE_SCALINGS = (None, 'pi', 'ntk', 'dynamic_ntk', 'yarn')
ATTN_IMPLS = ('auto', 'naive', 'chunked', 'triton')


def check_config(config):
    """Fail early, with a message that says what to change, on a config that cannot work."""
    if config.pos_encoding not in POS_ENCODINGS:
        raise ValueError(f"pos_encoding={config.pos_encoding!r} is not one of {POS_ENCODINGS}")
    if config.rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling={config.rope_scaling!r} is not one of {ROPE_SCALINGS}")
    if config.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={config.attn_impl!r} is not one of {ATTN_IMPLS}")
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
    head_dim = config.n_embd // config.n_head
    if config.pos_encoding == 'tapa':
        tapa_split(head_dim, config.tapa_theta)
        check_tapa_args(config.tapa_alpha, config.tapa_phase)
        if not (math.isfinite(config.tapa_phase_scale) and config.tapa_phase_scale > 0):
            raise ValueError(f"tapa_phase_scale={config.tapa_phase_scale!r} must be a finite number > 0")
    if config.pos_encoding == 'rope':
        if head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dims: head dim {head_dim} must be even")
        if config.rope_scaling in ('ntk', 'dynamic_ntk') and head_dim < 4:
            raise ValueError(f"rope_scaling={config.rope_scaling!r} rescales the base by factor^(D/(D-2)): "
                             f"it needs a head dim of at least 4, not {head_dim}")
        if config.rope_scaling is not None and config.rope_factor < 1.0:
            raise ValueError(f"rope_factor={config.rope_factor} must be >= 1 (it is the context extension factor)")
        if config.rope_scaling == 'yarn' and not config.yarn_beta_fast > config.yarn_beta_slow > 0:
            # swapped, YaRN's ramp would run backwards: the fast pairs interpolated, the slow ones kept
            raise ValueError(f"yarn_beta_fast={config.yarn_beta_fast} must be larger than yarn_beta_slow="
                             f"{config.yarn_beta_slow}, and both positive (YaRN's 32 and 1)")


# -----------------------------------------------------------------------------
# Positional encodings, part 1: the classics
#
# Every attention below computes, for a query at position m and a key at position n <= m,
#     softmax_n( score(m, n) ) @ v
# and the positional encodings differ only in how position enters score(m, n).
#
# Learned absolute (GPT-2): x_m = token_emb(t_m) + pos_emb(m); score = q_m.k_n / sqrt(D).
#   Lives in GPT.forward (self.transformer.wpe). It cannot run past block_size: there is no
#   embedding for position block_size.
#
# NoPE: score = q_m.k_n / sqrt(D), no position at all. A causal mask alone lets a decoder infer
#   positions (Kazemnejad et al. 2023).
#
# ALiBi (Press et al. 2021, Eq. in Sec. 3): score = q_m.k_n / sqrt(D) - slope_h * (m - n),
#   a fixed linear penalty on distance with one slope per head, a geometric sequence.


def alibi_slopes(n_head):
    """ALiBi's head slopes: 2^(-8/n), 2^(-16/n), ... for n heads (n a power of 2); other head counts
    take the slopes of the next lower power of 2 and interleave extra ones from the next higher (as
    the authors' reference code does)."""
    def power_of_2_slopes(n):
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_head).is_integer():
        slopes = power_of_2_slopes(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_2_slopes(closest) + power_of_2_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def causal_mask(Tq, Tk, device):
    """True where query i (at absolute position Tk-Tq+i, i.e. the LAST Tq positions) may see key j.
    PyTorch's is_causal=True aligns the mask top-left, which is wrong once Tq < Tk (a KV cache)."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device)
    k_pos = torch.arange(Tk, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def dot_product_attention(q, k, v, bias=None, impl='auto'):
    """softmax(q.k / sqrt(D) + bias, causal) @ v for NoPE, learned, RoPE (q, k rotated) and ALiBi (bias).
    'naive' materializes the scores so you can read it; otherwise PyTorch's fused SDPA (FlashAttention
    or a memory-efficient kernel where the device has one) computes exactly the same thing."""
    Tq, Tk = q.size(-2), k.size(-2)
    if impl == 'naive':
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if bias is not None:
            att = att + bias
        att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
        return F.softmax(att.float(), dim=-1).to(q.dtype) @ v
    if bias is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = causal_mask(Tq, Tk, q.device)
    if bias is not None:
        mask = bias.to(q.dtype).masked_fill(~mask, float('-inf'))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def alibi_bias(slopes, Tq, Tk, device):
    """(H, Tq, Tk) additive bias -slope_h * (m - n) for queries at the last Tq positions."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device)
    k_pos = torch.arange(Tk, device=device)
    distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()
    return -slopes.to(device)[:, None, None] * distance


# -----------------------------------------------------------------------------
# Positional encodings, part 2: RoPE and its long-context family
#
# RoPE (RoFormer, Sec. 3.2) rotates each pair of dims (2i, 2i+1) of q and k by the angle pos * w_i,
#     w_i = base^(-2i/D),  i = 0 .. D/2-1,
# so that q_m.k_n depends on positions only through m-n. Pair i completes a full turn every
# 2*pi/w_i tokens: high-frequency pairs (small i) encode local order, low-frequency ones (large i)
# rotate less than once over the whole training context. Past the trained length, the low pairs
# see angles they never saw in training, and perplexity explodes. The family below changes w_i:
#
#   ABF:   a larger base (5e5 instead of 1e4): slower rotations everywhere. Just set rope_base.
#   PI:    w_i / s for every pair: squeeze s times more positions into the trained angle range.
#   NTK:   base * s^(D/(D-2)): the lowest frequency is divided by s, the highest barely moves.
#   dynamic NTK: NTK with s chosen from the current length, s' = s*T/T_orig - (s-1), only once T > T_orig.
#   YaRN:  interpolate (w_i/s) only the pairs that rotate less than beta_slow times over the original
#          context, keep (w_i) those that rotate more than beta_fast times, ramp linearly between;
#          and sharpen the softmax by a temperature: scale q and k by 0.1*ln(s)+1 each.
# These follow the Hugging Face rope utilities ('linear', 'dynamic', 'yarn') and the YaRN reference code.


def rope_frequencies(head_dim, base, scaling=None, factor=1.0, original_block_size=None,
                     beta_fast=32.0, beta_slow=1.0, seq_len=None):
    """Returns (inv_freq, attention_scale): the head_dim/2 rotation frequencies w_i, and the factor
    that multiplies cos and sin (so q.k is scaled by its square; 1.0 except for YaRN)."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim  # 2i/D
    inv_freq = 1.0 / (base ** dims)
    attention_scale = 1.0
    if scaling is None or factor == 1.0 and scaling != 'dynamic_ntk':
        pass
    elif scaling == 'pi':
        inv_freq = inv_freq / factor
    elif scaling == 'ntk':
        inv_freq = 1.0 / ((base * factor ** (head_dim / (head_dim - 2))) ** dims)
    elif scaling == 'dynamic_ntk':
        if original_block_size is None or seq_len is None:
            raise ValueError("dynamic_ntk needs original_block_size and the current seq_len")
        if seq_len > original_block_size:
            s = factor * seq_len / original_block_size - (factor - 1)
            inv_freq = 1.0 / ((base * s ** (head_dim / (head_dim - 2))) ** dims)
    elif scaling == 'yarn':
        if original_block_size is None:
            raise ValueError("yarn needs original_block_size (the pretraining context)")

        # the (fractional) pair index whose wavelength fits num_rotations times into the original context
        def correction_dim(num_rotations):
            return head_dim * math.log(original_block_size / (num_rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # avoid a division by zero in the ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        # ramp = 0: keep the original frequency (extrapolate); ramp = 1: interpolate it by the factor
        inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
        attention_scale = 0.1 * math.log(factor) + 1.0
    else:
        raise ValueError(f"unknown rope scaling {scaling!r}, expected one of {ROPE_SCALINGS}")
    return inv_freq.float(), attention_scale


@torch.compiler.disable  # a table computed once: torch 2.4's inductor fails on base ** dims (Invalid NaN comparison)
def rope_cos_sin(config, head_dim, seq_len, device):
    """cos and sin of the angles pos * w_i for positions 0..seq_len-1, shape (seq_len, head_dim/2),
    already multiplied by YaRN's attention scale."""
    original = config.rope_original_block_size or config.block_size
    inv_freq, attention_scale = rope_frequencies(
        head_dim, config.rope_base, config.rope_scaling, config.rope_factor, original,
        config.yarn_beta_fast, config.yarn_beta_slow, seq_len)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq).to(device)
    return angles.cos() * attention_scale, angles.sin() * attention_scale


def apply_rope(x, cos, sin):
    """Rotate each pair (x_2i, x_2i+1) of the last dim by its angle: x (B, H, T, D), cos/sin (T, D/2)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# -----------------------------------------------------------------------------
# Positional encodings, part 3: TAPA, Token-Aware Phase Attention (arXiv 2509.12635)
#
# TAPA removes RoPE. Each head's q and k (head dim D) are split into an amplitude part (the first
# theta*D dims) and a phase part (the other (1-theta)*D dims). The score of query m and key n
# (paper Eq. 12) is
#
#     score(m, n) = q_A.k_A / sqrt(theta*D)  *  cos( 2*pi * |m-n|^alpha * phi(q, k) ),
#     phi(q, k)   = q_P.k_P / sqrt((1-theta)*D)                  ('quadratic', the paper's choice)
#                 = (sum(q_P) + sum(k_P)) / sqrt((1-theta)*D)    ('linear', the paper's ablation)
#
# then the causal mask, softmax and @ v as usual; alpha = 0.1, theta = 0.5 by default, no new
# parameters. Why it extrapolates: the phase is a property of the *tokens* (phi) modulated by a
# slowly growing function of distance (|m-n|^0.1 goes only from 1 to 2 between 1 and 1024 tokens),
# so there are no per-dimension rotation frequencies that can fall out of their trained range.
# The paper shows that its expected long-range bias decays like |m-n|^(-alpha*(1-theta)*D)
# (Theorems 3.2-3.3) while individual scores keep their variance: far tokens stay attendable.
#
# It needs two q.k products and an elementwise cos per score, which is why PyTorch's fused SDPA and
# FlashAttention cannot run it. Below: the readable version (materializes the Tq x Tk scores), and an
# exact chunked version whose memory grows linearly in T in forward *and* backward.


def tapa_split(head_dim, theta):
    """Widths (d_A, d_P) of the amplitude and phase parts; both must be positive whole numbers."""
    d_amp = theta * head_dim
    if not (0.0 < theta < 1.0) or abs(d_amp - round(d_amp)) > 1e-6 or round(d_amp) in (0, head_dim):
        raise ValueError(
            f"tapa_theta={theta} with head dim {head_dim} gives an amplitude part of {d_amp:g} dims and a "
            f"phase part of {head_dim - d_amp:g}: both must be positive whole numbers "
            f"(e.g. theta=0.5 or 0.25 for head dim {head_dim})")
    d_amp = round(d_amp)
    return d_amp, head_dim - d_amp


def check_tapa_args(alpha, phase):
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"tapa_alpha={alpha!r} must be a finite number > 0 (|m-n|^alpha with alpha <= 0 "
                         f"carries no distance information, or divides by zero at m = n)")
    if phase not in ('quadratic', 'linear'):
        raise ValueError(f"tapa_phase={phase!r} must be 'quadratic' or 'linear'")


def tapa_distance_weight(q_start, Tq, k_start, Tk, alpha, device):
    """|m-n|^alpha for queries at absolute positions q_start.. and keys at k_start.., shape (Tq, Tk).
    Future keys (n > m) get 0: they are masked anyway, and 0 keeps their cos finite."""
    m = torch.arange(q_start, q_start + Tq, device=device)
    n = torch.arange(k_start, k_start + Tk, device=device)
    return (m[:, None] - n[None, :]).clamp(min=0).float() ** alpha


def autocast_off(device):
    """A context in which autocast leaves this device's ops in the dtype they are given: TAPA's angle
    must stay float32. (Nothing to turn off where this torch has no autocast for the device, e.g.
    Apple's MPS before torch 2.5, which refuses even to build a disabled one.)"""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return nullcontext()


def tapa_scores(q, k, weight, d_amp, phase):
    """The pre-softmax TAPA scores of Eq. 12 (no mask), plus the pieces the backward needs.
    q (..., Tq, D), k (..., Tk, D), weight = |m-n|^alpha (Tq, Tk). All of it runs in float32 (float64
    for float64 inputs), the two dot products included, autocast or not: a bf16 angle of 30 radians is
    off by a tenth of a radian, and so is one made from a bf16 q_P.k_P."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    d_phase = q.size(-1) - d_amp
    with autocast_off(q.device):
        q, k = q.to(dtype), k.to(dtype)
        q_amp, q_phase = q[..., :d_amp], q[..., d_amp:]
        k_amp, k_phase = k[..., :d_amp], k[..., d_amp:]
        amplitude = (q_amp @ k_amp.transpose(-2, -1)) / math.sqrt(d_amp)
        if phase == 'quadratic':
            phi = (q_phase @ k_phase.transpose(-2, -1)) / math.sqrt(d_phase)
        else:  # 'linear'
            phi = (q_phase.sum(-1)[..., :, None] + k_phase.sum(-1)[..., None, :]) / math.sqrt(d_phase)
        angle = 2 * math.pi * weight.to(dtype) * phi
        return amplitude * torch.cos(angle), amplitude, angle


def tapa_attention_naive(q, k, v, alpha, theta, phase='quadratic'):
    """Eq. 12 exactly as written: materialize the Tq x Tk scores, mask, softmax, @ v."""
    Tq, Tk = q.size(-2), k.size(-2)
    d_amp, _ = tapa_split(q.size(-1), theta)
    weight = tapa_distance_weight(Tk - Tq, Tq, 0, Tk, alpha, q.device)
    scores, _, _ = tapa_scores(q, k, weight, d_amp, phase)  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
    return F.softmax(scores, dim=-1).to(v.dtype) @ v


def tapa_tile_tables(alpha, rows, Tk, device, dtype=torch.float32, scale=1.0):
    """The weights |m-n|^alpha and the causal mask depend on m-n only, so those of every
    (query block x key block) tile are a window into one small table, built once per call instead
    of once per tile. With distance[a, u] = a + Tk - u, shape (rows, Tk + rows), the tile of the
    queries at absolute positions o, o+1, .. (rows a) and the keys j0..j1-1 is the column window
    [j0 + Tk - o, j1 + Tk - o): column n + Tk - o of row a holds o + a - n = m - n. A view, no copy.
    Returns (weight, future): scale * max(m-n, 0)^alpha (future keys get 0, as in tapa_distance_weight:
    they are masked anyway), and True where the key is in the future of the query (n > m)."""
    a = torch.arange(rows, device=device)[:, None]
    u = torch.arange(Tk + rows, device=device)[None, :]
    distance = a + Tk - u
    powers = torch.arange(Tk + rows, device=device, dtype=dtype) ** alpha * scale  # each distinct d^alpha once
    return powers[distance.clamp(min=0)], distance < 0


class ChunkedTAPA(torch.autograd.Function):
    """Exact TAPA attention in tiles, FlashAttention-style, on plain PyTorch ops.

    Forward: for each block of queries, walk over the key blocks up to the diagonal (blocks fully in
    the future are skipped) and keep a running max, running softmax denominator and running output
    ("online softmax"), so only one (block x block) tile of scores exists at a time. We save the
    output and the log-sum-exp of each query row.

    Backward: recompute each tile's scores, turn them into probabilities with the saved log-sum-exp,
    and push the gradient through softmax, then through score = amplitude * cos(angle):
        d amplitude = dS * cos(angle),      d phi = -dS * amplitude * sin(angle) * 2*pi*|m-n|^alpha
    and on into q and k. Nothing of size Tq x Tk is ever stored, in either direction.

    Where the time goes, on a CPU: about 60% in the matmuls (as many flops as SDPA's, but split into
    amplitude and phase halves of D/2 dims, which BLAS runs less efficiently than one of D dims), most
    of the rest in the elementwise passes over each tile (each one reads and writes the whole tile:
    cos, sin, exp, the products). So the code below keeps those passes few:
      - the constants are applied once, not per tile: 1/sqrt(d_A) to q, 2*pi/sqrt(d_P) to the table of
        distance weights (not to q: with TF32 matmuls, on by default on GPUs in train.py, a rescaled q
        would be rounded to 10 bits, where bfloat16 values pass exactly),
      - the weights |m-n|^alpha and the mask come from tables built once (tapa_tile_tables),
      - tiles are updated in place (x.mul_(y) instead of x * y: no new tile to allocate and fill),
      - only the tiles that cross the diagonal are masked,
      - a 128 x 128 tile of 8 heads is 512 KiB in float32, small enough to stay in a CPU's L2 cache
        while the ten-odd passes run over it (64 and 256 were slower at T = 1024 and 4096).
    With these, forward + backward takes about 1.5-2x the time of RoPE + SDPA on a CPU (README.md).
    """

    @staticmethod
    def forward(ctx, q, k, v, alpha, d_amp, phase, chunk_size):
        # The tiles are computed in float32 (float64 for float64 inputs) whatever the input dtype.
        # Under autocast, torch.bmm would run in bfloat16 or float16 instead, and the in-place
        # float32 updates below (baddbmm_) would refuse its output: autocast stays off in here.
        with autocast_off(q.device):
            B, H, Tq, D = q.shape
            Tk = k.size(-2)
            q_start = Tk - Tq  # absolute position of the first query
            acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            q_amp, q_phase, k_amp, k_phase, v = _tapa_parts(q, k, v, d_amp, phase, acc_dtype)
            weights, future = tapa_tile_tables(alpha, min(chunk_size, Tq), Tk, q.device, acc_dtype,
                                               scale=2 * math.pi / math.sqrt(D - d_amp))
            key_chunk = _key_chunk(chunk_size, Tq)
            out = torch.empty(B, H, Tq, D, device=q.device, dtype=acc_dtype)
            lse = torch.empty(B * H, Tq, 1, device=q.device, dtype=acc_dtype)
            for i0 in range(0, Tq, chunk_size):
                i1 = min(i0 + chunk_size, Tq)
                m0 = q_start + i0      # absolute position of this block's first query
                last_visible = m0 + (i1 - i0)  # keys [0, last_visible) can be seen by some query here
                row_max = torch.full((B * H, i1 - i0, 1), float('-inf'), device=q.device, dtype=acc_dtype)
                row_sum = torch.zeros((B * H, i1 - i0, 1), device=q.device, dtype=acc_dtype)
                acc = torch.zeros((B * H, i1 - i0, D), device=q.device, dtype=acc_dtype)
                for j0 in range(0, last_visible, key_chunk):
                    j1 = min(j0 + key_chunk, last_visible)
                    window = (slice(0, i1 - i0), slice(j0 + Tk - m0, j1 + Tk - m0))  # see tapa_tile_tables
                    amplitude, angle = _tapa_tile(q_amp[:, i0:i1], q_phase[:, i0:i1], k_amp[:, j0:j1],
                                                  k_phase[:, j0:j1], weights[window], phase)
                    s = amplitude.mul_(angle.cos_())  # the scores, Eq. 12
                    if j1 - 1 > m0:  # this tile crosses the diagonal: mask the future keys
                        s.masked_fill_(future[window], float('-inf'))
                    new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
                    p = s.sub_(new_max).exp_()
                    correction = (row_max - new_max).exp_()
                    row_sum.mul_(correction).add_(p.sum(-1, keepdim=True))
                    acc.mul_(correction).baddbmm_(p, v[:, j0:j1])  # acc = acc * correction + p @ v
                    row_max = new_max
                out.view(B * H, Tq, D)[:, i0:i1] = acc.div_(row_sum)
                lse[:, i0:i1] = row_max + row_sum.log()
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.alpha, ctx.d_amp, ctx.phase, ctx.chunk_size = alpha, d_amp, phase, chunk_size
            return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is wanted
            raise RuntimeError("the chunked TAPA attention has no second derivative (its backward is not "
                               "differentiable); use attn_impl='naive' for create_graph=True")
        with autocast_off(grad_out.device):  # see forward
            q, k, v, out, lse = ctx.saved_tensors
            alpha, d_amp, phase, chunk_size = ctx.alpha, ctx.d_amp, ctx.phase, ctx.chunk_size
            B, H, Tq, D = q.shape
            Tk = k.size(-2)
            q_start = Tk - Tq
            acc_dtype = out.dtype
            q_amp, q_phase, k_amp, k_phase, v = _tapa_parts(q, k, v, d_amp, phase, acc_dtype)
            weights, future = tapa_tile_tables(alpha, min(chunk_size, Tq), Tk, q.device, acc_dtype,
                                               scale=2 * math.pi / math.sqrt(D - d_amp))
            key_chunk = _key_chunk(chunk_size, Tq)
            grad_out = grad_out.reshape(B * H, Tq, D).to(acc_dtype)
            # softmax backward needs rowsum(dO * O) = sum_n P[m,n] * dP[m,n]
            delta = (grad_out * out.view(B * H, Tq, D)).sum(-1, keepdim=True)
            # gradients w.r.t. the (scaled) parts of _tapa_parts; the chain rule back to q, k is at the end
            dq_amp, dq_phase = torch.zeros_like(q_amp), torch.zeros_like(q_phase)
            dk_amp, dk_phase, dv = torch.zeros_like(k_amp), torch.zeros_like(k_phase), torch.zeros_like(v)
            for i0 in range(0, Tq, chunk_size):
                i1 = min(i0 + chunk_size, Tq)
                m0 = q_start + i0
                do_i, lse_i, delta_i = grad_out[:, i0:i1], lse[:, i0:i1], delta[:, i0:i1]
                for j0 in range(0, m0 + (i1 - i0), key_chunk):
                    j1 = min(j0 + key_chunk, m0 + (i1 - i0))
                    window = (slice(0, i1 - i0), slice(j0 + Tk - m0, j1 + Tk - m0))
                    weight = weights[window]
                    amplitude, angle = _tapa_tile(q_amp[:, i0:i1], q_phase[:, i0:i1], k_amp[:, j0:j1],
                                                  k_phase[:, j0:j1], weight, phase)
                    cos = angle.cos()
                    amplitude_sin = angle.sin_().mul_(amplitude)
                    p = amplitude.mul_(cos)  # the scores (amplitude's own values are no longer needed)
                    if j1 - 1 > m0:
                        p.masked_fill_(future[window], float('-inf'))
                    p.sub_(lse_i).exp_()  # the probabilities of this tile
                    dv[:, j0:j1].baddbmm_(p.transpose(1, 2), do_i)
                    ds = torch.bmm(do_i, v[:, j0:j1].transpose(1, 2)).sub_(delta_i).mul_(p)  # dL/dscore
                    d_amplitude = cos.mul_(ds)
                    # dL/dphi = -ds * amplitude * sin(angle) * weight; we keep it without its minus sign
                    # (one pass fewer) and subtract in the matmuls below (alpha=-1)
                    minus_d_phi = amplitude_sin.mul_(ds).mul_(weight)
                    dq_amp[:, i0:i1].baddbmm_(d_amplitude, k_amp[:, j0:j1])
                    dk_amp[:, j0:j1].baddbmm_(d_amplitude.transpose(1, 2), q_amp[:, i0:i1])
                    if phase == 'quadratic':
                        dq_phase[:, i0:i1].baddbmm_(minus_d_phi, k_phase[:, j0:j1], alpha=-1)
                        dk_phase[:, j0:j1].baddbmm_(minus_d_phi.transpose(1, 2), q_phase[:, i0:i1], alpha=-1)
                    else:  # linear: phi = q_sum + k_sum
                        dq_phase[:, i0:i1] -= minus_d_phi.sum(-1, keepdim=True)
                        dk_phase[:, j0:j1] -= minus_d_phi.sum(-2)[..., None]
            # back through the scaling of _tapa_parts (2*pi/sqrt(d_P) is in the weights already) and,
            # for 'linear', through the sums: each phase dim of a token gets its sum's gradient
            dq_amp /= math.sqrt(d_amp)
            if phase == 'linear':
                dq_phase, dk_phase = dq_phase.expand(-1, -1, D - d_amp), dk_phase.expand(-1, -1, D - d_amp)
            dq = torch.cat((dq_amp, dq_phase), dim=-1).view(B, H, Tq, D)
            dk = torch.cat((dk_amp, dk_phase), dim=-1).view(B, H, Tk, D)
            return dq.to(q.dtype), dk.to(k.dtype), dv.view(B, H, Tk, D).to(v.dtype), None, None, None, None


def _tapa_parts(q, k, v, d_amp, phase, dtype):
    """q, k, v (B, H, T, D) -> (B*H, T, .) pieces in the compute dtype, 1/sqrt(d_A) folded into q, so
    that with weight = 2*pi/sqrt(d_P) * |m-n|^alpha (tapa_tile_tables) a tile needs no more than
        amplitude = q_amp @ k_amp^T,   angle = weight * (q_phase @ k_phase^T)   ('quadratic')
                                       angle = weight * (q_phase + k_phase^T)   ('linear': sums)."""
    B, H, Tq, D = q.shape
    q, k, v = (t.reshape(B * H, -1, D).to(dtype) for t in (q, k, v))
    q_amp, k_amp = q[..., :d_amp] / math.sqrt(d_amp), k[..., :d_amp]
    if phase == 'quadratic':
        q_phase, k_phase = q[..., d_amp:], k[..., d_amp:]
    else:  # 'linear': phi = (sum(q_P) + sum(k_P)) / sqrt(d_P), one number per token
        q_phase, k_phase = q[..., d_amp:].sum(-1, keepdim=True), k[..., d_amp:].sum(-1, keepdim=True)
    return q_amp, q_phase, k_amp, k_phase, v


def _key_chunk(chunk_size, Tq):
    """Keys per tile. Tiles are chunk_size x chunk_size, except with fewer than chunk_size queries
    (decoding with a KV cache: Tq = 1): then the key blocks grow so that a tile still holds about
    chunk_size^2 scores, instead of walking a long cache in slivers of one Python step each."""
    return max(chunk_size, (chunk_size * chunk_size) // max(Tq, 1))


def _tapa_tile(q_amp, q_phase, k_amp, k_phase, weight, phase):
    """One tile's amplitude and angle (both fresh tensors, free to be overwritten in place)."""
    amplitude = torch.bmm(q_amp, k_amp.transpose(1, 2))
    if phase == 'quadratic':
        angle = torch.bmm(q_phase, k_phase.transpose(1, 2))
    else:
        angle = q_phase + k_phase.transpose(1, 2)
    return amplitude, angle.mul_(weight)


def tapa_attention(q, k, v, alpha, theta, phase='quadratic', impl='naive', chunk_size=128):
    """TAPA attention (Eq. 12). q (B, H, Tq, D), k and v (B, H, Tk, D) with Tq <= Tk: the queries are
    the LAST Tq positions (so this also serves a KV cache). Causal. Returns (B, H, Tq, D).
    impl: 'naive' (materialized), 'chunked' (exact, memory linear in T), 'triton' (fused CUDA kernel)."""
    Tq, Tk = q.size(-2), k.size(-2)
    if Tq > Tk:
        raise ValueError(f"tapa_attention: {Tq} queries but only {Tk} keys; queries must be the last Tq positions")
    d_amp, _ = tapa_split(q.size(-1), theta)
    check_tapa_args(alpha, phase)
    if impl == 'naive':
        return tapa_attention_naive(q, k, v, alpha, theta, phase)
    if impl == 'chunked':
        return ChunkedTAPA.apply(q, k, v, alpha, d_amp, phase, chunk_size)
    if impl == 'triton':
        from tapa_triton import tapa_attention_triton  # optional, imported only when asked for
        return tapa_attention_triton(q, k, v, alpha, theta, phase)
    raise ValueError(f"unknown TAPA impl {impl!r}: use 'naive', 'chunked' or 'triton'")


def pick_tapa_impl(requested, device, Tq, Tk, head_dim, dtype):
    """'auto' -> the fused kernel on an NVIDIA GPU when Triton is installed and takes this head dim and
    dtype; otherwise the naive path while the score matrix is small (up to 128 x 128 per head, or one
    query against up to 16384 keys when decoding with a KV cache), where its few big ops beat the
    chunked path's Python loop and its memory does not matter; the chunked path beyond that, with
    memory linear in T. (On a 2-core Xeon, forward + backward: naive 7-15% faster at T = 128, chunked
    ~25% faster at T = 256.)"""
    if requested != 'auto':
        return requested
    if device.type == 'cuda':
        try:
            import tapa_triton
            if tapa_triton.is_available() and tapa_triton.supports(head_dim, dtype, device):
                return 'triton'
        except ImportError:
            pass
    return 'naive' if Tq * Tk <= 128 * 128 else 'chunked'


# Making TAPA learn in a small model. At GPT-2 initialization q_P.k_P is tiny, so every angle is near
# 0, where cos is flat (its slope, -sin, is ~0): the phase gets almost no useful gradient, while Adam
# still moves the phase weights by ~lr per step. The phase then grows into content-dependent noise on
# every score before it has learned anything, and a 4-layer model stalls near the bigram level.
# Two knobs, neither of which changes what the model can express (scaling phi by g is the same as
# scaling the phase rows of the q projection, so the function class is exactly Eq. 12's):
#   tapa_phase_scale = g (config): phi -> g * phi. With Adam this acts like a g-times smaller init and
#       learning rate for the phase projections: g < 1 lets the amplitude (content) part learn first.
#   tapa_phase_warmup_iters (train.py): phi -> ramp * phi with ramp going linearly from ~0 to 1, so
#       the phase comes in after the model has learned local structure; at ramp = 1 it is Eq. 12 again.
# Both are applied in CausalSelfAttention.attend by scaling q_P (and k_P for the linear phase) before
# tapa_attention, so every implementation (naive, chunked, Triton) supports them unchanged.
# Measured on a 4-layer byte model (README.md, "Making TAPA learn at small scale"): scale 0.05 with
# RoPE's learning rate takes the validation loss from 2.29 to 1.91 and keeps the extrapolation; the
# warm-up alone helps less (2.09).


# -----------------------------------------------------------------------------
# The transformer


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.config = config
        self.n_head = config.n_head
        if config.pos_encoding == 'alibi':
            self.register_buffer('alibi_slopes', alibi_slopes(config.n_head), persistent=False)
        if config.pos_encoding == 'tapa':
            # per-dim multipliers of q (and, for the linear phase, of k): 1 on the amplitude dims and
            # tapa_phase_scale * ramp on the phase dims, so phi is multiplied by that factor (see
            # GPT.set_tapa_phase_ramp). Skipped entirely while the factor is 1, i.e. Eq. 12 as published.
            self.register_buffer('tapa_dim_scale', torch.ones(config.n_embd // config.n_head), persistent=False)
            self.tapa_phase_scaled = False  # a bool, not the factor: torch.compile then needn't recompile per step

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            # The KV cache keeps keys *before* RoPE, so a length-dependent RoPE (dynamic NTK) rotates
            # every key with the frequencies of the current length, as a full forward pass of the text
            # so far would. For dynamic NTK that is exact in the first layer only: the cached keys and
            # values of the deeper layers come from hidden states computed at the shorter lengths of
            # earlier steps (Hugging Face's cache, which stores rotated keys, is off in every layer).
            if 'k' in cache:
                k, v = torch.cat((cache['k'], k), dim=2), torch.cat((cache['v'], v), dim=2)
            cache['k'], cache['v'] = k, v
        y = self.attend(q, k, v, rope)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, rope):
        """Causal attention of the T queries (the last positions) over all Tk keys: this is the one
        place where the positional encoding enters."""
        cfg, Tq, Tk = self.config, q.size(2), k.size(2)
        if cfg.pos_encoding == 'tapa':
            if self.tapa_phase_scaled:  # phi is bilinear in (q_P, k_P) ('quadratic') or linear in both
                # (back to q's dtype: under autocast q is bfloat16 and the float32 scale would make it
                # float32, while k and v stay bfloat16, which the fused kernel refuses)
                q = (q * self.tapa_dim_scale).to(q.dtype)
                k = (k * self.tapa_dim_scale).to(k.dtype) if cfg.tapa_phase == 'linear' else k
            impl = pick_tapa_impl(cfg.attn_impl, q.device, Tq, Tk, q.size(-1), q.dtype)
            return tapa_attention(q, k, v, cfg.tapa_alpha, cfg.tapa_theta, cfg.tapa_phase, impl)
        impl = 'naive' if cfg.attn_impl == 'naive' else 'auto'
        if cfg.pos_encoding == 'rope':
            cos, sin = rope
            q, k = apply_rope(q, cos[Tk - Tq:Tk], sin[Tk - Tq:Tk]), apply_rope(k, cos[:Tk], sin[:Tk])
            return dot_product_attention(q, k, v, impl=impl)
        if cfg.pos_encoding == 'alibi':
            return dot_product_attention(q, k, v, bias=alibi_bias(self.alibi_slopes, Tq, Tk, q.device), impl=impl)
        return dot_product_attention(q, k, v, impl=impl)  # 'nope' and 'learned' (position is in the embedding)


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
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_encoding == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output projection share one matrix
        self.transformer.wte.weight = self.lm_head.weight
        # GPT-2 init: N(0, 0.02), and the residual projections scaled by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self._rope_cache = {}
        self.set_tapa_phase_ramp(1.0)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the position embeddings (the token embeddings are
        counted, because weight tying makes them the output layer too)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_encoding == 'learned':
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def rope(self, seq_len, device):
        """(cos, sin) for positions 0..seq_len-1, cached: recomputed only when the length bucket or the
        config changes (dynamic NTK depends on the length itself, so it is keyed by it)."""
        cfg = self.config
        if cfg.pos_encoding != 'rope':
            return None
        if cfg.rope_scaling == 'dynamic_ntk':
            n = seq_len
        else:  # cache for a power-of-two length at least seq_len and slice
            n = max(cfg.block_size, 1 << (seq_len - 1).bit_length())
        key = (n, str(device), cfg.rope_base, cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_block_size,
               cfg.block_size, cfg.yarn_beta_fast, cfg.yarn_beta_slow)
        if key not in self._rope_cache:
            # normal tensors even when first made under torch.inference_mode() (sampling, evaluation):
            # a later training step saves them for its backward, which autograd refuses for those
            with torch.inference_mode(False):
                self._rope_cache = {key: rope_cos_sin(cfg, cfg.n_embd // cfg.n_head, n, device)}
        cos, sin = self._rope_cache[key]
        return cos[:seq_len], sin[:seq_len]

    def hidden(self, idx, kv_cache=None):
        """The final-LayerNorm'd hidden states (B, T, n_embd) of the tokens idx (B, T). With a KV cache
        (from new_kv_cache()), idx holds only the new tokens, placed after the cached ones."""
        B, T = idx.size()
        past = kv_cache[0]['k'].size(2) if kv_cache is not None and 'k' in kv_cache[0] else 0
        x = self.transformer.wte(idx)
        if self.config.pos_encoding == 'learned':
            if past + T > self.config.block_size:
                raise ValueError(
                    f"learned position embeddings exist only for {self.config.block_size} positions, "
                    f"but this input reaches position {past + T}; use a shorter context, or another "
                    f"pos_encoding (tapa, rope, alibi, nope run at any length)")
            x = x + self.transformer.wpe(torch.arange(past, past + T, device=idx.device))
        x = self.transformer.drop(x)
        rope = self.rope(past + T, idx.device)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, kv_cache[i] if kv_cache is not None else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None):
        """Every PE except 'learned' accepts inputs longer than block_size: running past the trained
        context is what this model is for (whether it still predicts well is what eval_ppl.py measures)."""
        x = self.hidden(idx, kv_cache)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:  # inference: only the last position's logits are needed
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def set_tapa_phase_ramp(self, ramp):
        """Multiply TAPA's phase phi by tapa_phase_scale * ramp in every layer (train.py ramps it in over
        tapa_phase_warmup_iters; it is 1 otherwise, and always after training). No-op for other PEs."""
        if self.config.pos_encoding != 'tapa':
            return
        factor = self.config.tapa_phase_scale * ramp
        d_amp, _ = tapa_split(self.config.n_embd // self.config.n_head, self.config.tapa_theta)
        for block in self.transformer.h:
            block.attn.tapa_dim_scale[d_amp:] = factor
            block.attn.tapa_phase_scaled = factor != 1.0

    def new_kv_cache(self):
        """An empty KV cache: one dict per layer, filled with the keys and values seen so far."""
        return [{} for _ in range(self.config.n_layer)]

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to fine-tune a pretrained model at a shorter length)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos_encoding == 'learned':
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def change_context(self, block_size, interpolate_learned=False, **pe_overrides):
        """Raise the context to block_size and apply config overrides (e.g. rope_scaling='yarn',
        rope_factor=4, rope_base=5e5) before long-context fine-tuning. RoPE remembers the pretraining
        context as rope_original_block_size (PI/YaRN/NTK need it). Learned position embeddings have
        no entry for the new positions: that is an error unless interpolate_learned=True, which
        stretches the table linearly (the learned-PE analogue of Position Interpolation)."""
        cfg = self.config
        for key, value in pe_overrides.items():
            if not hasattr(cfg, key):
                raise ValueError(f"change_context: unknown config field {key!r}")
        if cfg.pos_encoding == 'rope' and cfg.rope_original_block_size is None:
            cfg.rope_original_block_size = cfg.block_size
        for key, value in pe_overrides.items():
            setattr(cfg, key, value)
        check_config(cfg)
        if cfg.pos_encoding == 'learned' and block_size > cfg.block_size:
            if not interpolate_learned:
                raise ValueError(
                    f"learned position embeddings cannot grow from {cfg.block_size} to {block_size} positions; "
                    f"pass interpolate_learned=True to stretch the table, or use another pos_encoding")
            old = self.transformer.wpe.weight.data  # (T_old, C) -> (T_new, C) by linear interpolation
            new = F.interpolate(old.t()[None], size=block_size, mode='linear', align_corners=True)[0].t()
            self.transformer.wpe = nn.Embedding(block_size, cfg.n_embd).to(old.device, old.dtype)
            self.transformer.wpe.weight.data.copy_(new)
        cfg.block_size = block_size
        self._rope_cache = {}

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices (2D params) only, never on biases, norms or gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda'  # the fused kernel is faster and exists on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=use_fused)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilization (PaLM appendix B), against an A100's bf16 peak by default."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_iter = (6 * N + 12 * L * H * Q * T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx (B, T) (temperature 0 = greedy), feeding only the newest
        token each step and keeping keys and values in a KV cache. Learned position embeddings stop at block_size (an error);
        the other PEs keep going past it."""
        cache = self.new_kv_cache()
        logits, _ = self(idx, kv_cache=cache)
        for step in range(max_new_tokens):
            logits = logits[:, -1, :].float()
            if temperature == 0:  # greedy decoding
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            if step + 1 < max_new_tokens:
                logits, _ = self(idx_next, kv_cache=cache)
        return idx
