"""
A fused TAPA attention for CUDA GPUs, written in Triton: forward and backward, FlashAttention-2 style.

What it computes (per batch and head; model.py has the same thing in plain PyTorch):

    S[m, n] = A[m, n] * cos(2*pi * |m-n|^alpha * phi[m, n])            (n <= m, causal)
    A[m, n]   = q_A[m] . k_A[n] / sqrt(d_A)                            amplitude, first d_A dims
    phi[m, n] = q_P[m] . k_P[n] / sqrt(d_P)                            'quadratic' phase, last d_P dims
              = (sum(q_P[m]) + sum(k_P[n])) / sqrt(d_P)                'linear' phase
    out = softmax_n(S) @ v

q is (B, H, Tq, D), k and v are (B, H, Tk, D) with Tq <= Tk: the queries are the LAST Tq positions,
so query i sits at absolute position m = Tk - Tq + i (this is what a KV cache needs).

Why a kernel at all: PyTorch's fused attention (SDPA / FlashAttention) only knows q.k scores plus an
additive bias, and TAPA's score is a *product* of two dot products through a cos. Without fusion the
(Tq x Tk) score matrix goes to memory, several times over (A, phi, cos, softmax, and their gradients).
Here each (BLOCK_M x BLOCK_N) tile of scores lives only in registers:

  forward   one program per block of queries walks over the key blocks left of the diagonal, keeps a
            running max / running sum / running output (the "online softmax"), and saves only the
            output and the log-sum-exp of each query row.
  backward  recomputes the score tiles from q, k and the saved log-sum-exp (cheaper than storing
            them). Two kernels, as in the Triton fused-attention tutorial: one program per key
            block accumulates dK and dV over the query blocks, one program per query block
            accumulates dQ over the key blocks. No atomics, so results are deterministic.
            Or one kernel that also adds dQ with atomics, as FlashAttention-2's CUDA code does:
            faster, and the default where it was measured faster unless PyTorch's deterministic
            mode is on, PyTorch's own rule for its FlashAttention (see tapa_attention_triton).

Cost: the two products q_A.k_A and q_P.k_P together are one full-width q.k product (d_A + d_P = D),
so the matrix-multiply work is that of FlashAttention (a bit more when d_A or d_P is not a power of
two: each part is zero-padded to one, e.g. 48 -> 64). On top of it each score needs |m-n|^alpha, a
cos (and a sin in the backward): elementwise work FlashAttention does not have, and that work, not
the matmuls, bounds this kernel. Measured on an H200 (bfloat16, head dim 64, L = 8192), the first
version took 4.1x the time of RoPE + FlashAttention for forward + backward, with ~61 (forward), ~69
(dQ) and ~178 (dK/dV) machine instructions per score in the kernels' main loops, and the
special-function unit (log2, exp2, cos, sin: 16 per clock per SM, against 128 multiply-adds) busy
with 4-5 operations per score. Since then: 4 warps for dK/dV (timed: -25%); cos and sin on the
special-function unit after an exact reduction to one turn (_cos_sin_2pi), instead of library and
Taylor-series code; |m-n|^alpha read from a table (_distance_weights) instead of a log2 and an exp2
per score; constant factors folded into multiply-adds or applied once per row or block; no row
tests in the loads of blocks that lie within the sequence (ROW_MASK). Triton 3.6 (as on that H200)
now issues ~18, ~25 and ~29 instructions per score, with 2 (forward) and 3
(backward) special-function operations (`python tests/test_tapa_triton_compile.py --worker --sass`
prints the counts, no GPU needed). Measured on an H100 with these: 2.06x the time of RoPE +
FlashAttention at L = 8192 (forward 1.5x, backward 2.4x) with the two-kernel backward; about 1.84x
with the single pass, from the same run's timings, now the default there (see tapa_attention_triton).
docs/performance.md has the numbers.

Usage: tapa_attention_triton(q, k, v, alpha, theta, phase) -- fast_attention.py calls it for attn_impl='triton' (or 'auto' on NVIDIA GPUs).
Without a GPU, Triton's interpreter runs the same kernels on CPU tensors when the environment variable
TRITON_INTERPRET=1 is set *before* this file is imported (slowly; tests/test_tapa_triton.py does that).
"""

import contextlib
import math
import os
import re
import types
import warnings

import torch

from model import tapa_split

# Triton is optional: this file must import cleanly without it (fast_attention.py asks is_available() to pick
# an implementation). Without Triton we put tiny stand-ins under the names `triton` and `tl` so the
# kernel definitions below still parse (their decorators and `tl.constexpr` annotations are evaluated
# at import time); nothing can launch them, and tapa_attention_triton() raises a clear error instead.
try:
    import triton
    import triton.language as tl
    try:
        from triton.language.extra import libdevice  # the fast cos and sin: _cos_sin_2pi
    except ImportError:  # older Triton
        from triton.language.extra.cuda import libdevice
    _TRITON_IMPORT_ERROR = None
    _version = re.match(r'(\d+)\.(\d+)', triton.__version__)  # '3.4.0', '3.5.0+git1234abcd'
    TRITON_VERSION = (int(_version.group(1)), int(_version.group(2))) if _version else (99, 0)
except Exception as e:  # ImportError, or a broken install
    _TRITON_IMPORT_ERROR = e
    TRITON_VERSION = (0, 0)
    triton = types.SimpleNamespace(jit=lambda fn=None, **options: fn if fn else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)


def is_available():
    """True when the fused kernel can run here: Triton imports and an NVIDIA GPU is present. (On AMD
    GPUs, where PyTorch also says 'cuda', Triton has no fast_cosf / fast_sinf: see _cos_sin_2pi.)"""
    return _TRITON_IMPORT_ERROR is None and torch.cuda.is_available() and torch.version.hip is None


def supports(head_dim, dtype, device=None):
    """True when the kernel takes q, k, v of this head dim and dtype (on this GPU, if given;
    tapa_attention_triton checks the rest); fast_attention.pick_tapa_impl asks, so that attn_impl='auto' falls
    back to PyTorch otherwise."""
    return (HEAD_DIMS[0] <= head_dim <= HEAD_DIMS[1] and dtype in DTYPES
            and turing_problem(head_dim, dtype, device) is None)


def turing_problem(head_dim, dtype, device):
    """Why the kernels cannot take this head dim and dtype on a Turing GPU (T4, RTX 20xx), or None.
    Only Turing has such limits, and the GPU is asked only in the cases they concern (every attention
    call asks this):
    - float32 above head dim 128 needs more shared memory than its 64 KB with any tiles here (see
      _tile_sizes);
    - Triton 3.0 to 3.3 (those of torch 2.4 to 2.7) fail to compile the float16 backward for it, with
      an internal error ("map::at", "Unsupported rounding mode for conversion") in the quadratic
      phase's float32 gradient matmuls; 3.4 on compile it. Both phases are refused: this check is not
      told the phase. (Found by compiling for sm_75 with each of those versions.)"""
    too_big = dtype == torch.float32 and head_dim > 128
    old_triton = dtype == torch.float16 and TRITON_VERSION < (3, 4)
    if not (too_big or old_triton) or device is None or device.type != 'cuda' \
            or torch.cuda.get_device_capability(device) >= (8, 0):
        return None
    if too_big:
        newer = ' (with Triton 3.4 or later)' if TRITON_VERSION < (3, 4) else ''
        return (f"float32 at head dim {head_dim} does not fit the shared memory of this GPU; use float16 "
                f"inputs{newer} or attn_impl='chunked'")
    float32 = 'float32 inputs, ' if head_dim <= 128 else ''
    return (f"Triton {triton.__version__} cannot compile the float16 backward for this GPU (Triton 3.4 and "
            f"later can: torch >= 2.8); use {float32}a newer Triton, or attn_impl='chunked'")


# Triton's CPU interpreter replaces the GPU compiler when TRITON_INTERPRET=1. The @triton.jit
# decorators below read the variable, so what counts is its value when this file is imported.
_INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
INTERPRETED = tl.constexpr(_INTERPRETED)  # the same, readable inside kernels


# Constants the kernels read. Triton only lets a kernel read globals wrapped in tl.constexpr.
# (log2(e) itself is only used on the host: it is folded into the amplitude scale, see forward)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2) = 1 / log2(e)
TWO_PI = tl.constexpr(6.283185307179586)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23, see _cos_sin_2pi
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)), and exp2 is the fast hardware instruction
HEAD_DIMS = (16, 256)  # the head dims the kernels take (each part zero-padded to a power of two)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -----------------------------------------------------------------------------
# Pieces shared by the forward and the backward kernels


@triton.jit
def _tile_ptrs(ptr, rows, n_rows, stride_row, col0, COLS: tl.constexpr, n_cols: tl.constexpr,
               ROW_MASK: tl.constexpr):
    """Pointers to a (len(rows) x COLS) tile -- rows `rows` of a (n_rows x D) matrix, columns col0 ..
    col0+COLS -- and the mask of its real entries. COLS is a power of two >= 16 (what tl.dot wants);
    the real width n_cols may be smaller (say 48 of 64, or 8 of 16), and rows may run past the end of
    the sequence: those entries are masked. ROW_MASK=False where the caller knows every row is real:
    the row test costs four instructions per load in a main loop, whose loads otherwise need none."""
    cols = tl.arange(0, COLS)
    mask = cols[None, :] < n_cols
    if ROW_MASK:
        mask = mask & (rows[:, None] < n_rows)
    return ptr + rows[:, None] * stride_row + (col0 + cols)[None, :], mask


@triton.jit
def _load_rows(ptr, rows, n_rows, stride_row, col0, COLS: tl.constexpr, n_cols: tl.constexpr,
               ROW_MASK: tl.constexpr = True):
    """Load a tile (see _tile_ptrs); masked entries read as 0. Zero columns add nothing to a dot
    product, which is how widths that are not powers of two are handled."""
    ptrs, mask = _tile_ptrs(ptr, rows, n_rows, stride_row, col0, COLS, n_cols, ROW_MASK)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, n_rows, stride_row, col0, COLS: tl.constexpr, n_cols: tl.constexpr):
    """The mirror of _load_rows: write only the real rows and columns."""
    ptrs, mask = _tile_ptrs(ptr, rows, n_rows, stride_row, col0, COLS, n_cols, True)
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _atomic_add_rows(ptr, value, rows, n_rows, stride_row, col0, COLS: tl.constexpr, n_cols: tl.constexpr,
                     ROW_MASK: tl.constexpr = True):
    """Add a tile to the real rows and columns, atomically (several programs add to the same rows)."""
    ptrs, mask = _tile_ptrs(ptr, rows, n_rows, stride_row, col0, COLS, n_cols, ROW_MASK)
    tl.atomic_add(ptrs, value, mask=mask, sem='relaxed')


@triton.jit
def _distance_weights(row_ptrs, col_offsets, keep, CAUSAL_MASK: tl.constexpr):
    """w = |m-n|^alpha / sqrt(d_P) for one tile, read from the table W[d] = d^alpha / sqrt(d_P)
    (W[0] = 0) that _distance_table builds once per setting. Tile entry [i, j] is W[m - n], at
    row_ptrs[i] + col_offsets[j]: row_ptrs[i] = W + the distance of row i at column 0, and
    col_offsets[j] = +j or -j. Both int64: then the compiler folds each constant column offset into
    the load instruction itself; int32 offsets cost three more instructions per score (each turned
    into a 64-bit address). Tiles that straddle the diagonal read only the visible entries, n <= m;
    the others are 0.

    Why a table: the power takes a log2 and an exp2 per score, two instructions of the GPU's
    special-function unit, which does 16 of them per clock per SM against 128 multiply-adds. The
    forward needs two more there (the cos and the softmax's exp2), the backward three (cos, sin,
    exp2), and these units, more than the matmuls, set the pace: the power was half of their work in
    the forward, two fifths in the backward. A table of Tk floats (32 KB at 8k keys) stays in the
    caches, and its tiles stream through shared memory like those of K and V. The phase's
    1/sqrt(d_P) rides along, so phi needs no scaling of its own."""
    ptrs = row_ptrs[:, None] + col_offsets[None, :]
    if CAUSAL_MASK:
        return tl.load(ptrs, mask=keep, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _cos_sin_2pi(t):
    """cos(2*pi*t) and sin(2*pi*t) for any t, to ~5e-7 (absolute).

    The angle grows with distance (|m-n|^alpha * phi turns), so reducing it to one turn must not lose
    accuracy. Counting in turns makes the reduction exact: r = t - round(t) only removes leading bits of
    t, leaving r in [-1/2, 1/2]. round(t) is (t + 1.5*2^23) - 1.5*2^23: the sum lands in [2^23, 2^24),
    where float32 holds only integers, so the addition itself rounds t to the nearest integer (exactly
    so for |t| < 2^22 turns; beyond that float32's t has no fraction of a turn left to keep). Two adds
    on the FMA units, where floor() is a conversion instruction, 4x slower on recent GPUs. Then the
    special-function unit gives cos and sin of 2*pi*r, in [-pi, pi], in one instruction each, with an
    absolute error below 2^-21 there (CUDA's __cosf / __sinf); beyond one turn that is smaller than the
    rounding error of t itself. The library tl.cos / tl.sin would spend tens of instructions per score
    on their own reduction. The interpreter has no fast_cosf: tl.cos there. The forward uses only cos;
    the compiler drops the unused sin."""
    nearest = (t + ROUND_MAGIC) - ROUND_MAGIC
    x = (t - nearest) * TWO_PI
    if INTERPRETED:
        cos_t = tl.cos(x)
        sin_t = tl.sin(x)
    else:
        cos_t = libdevice.fast_cosf(x)
        sin_t = libdevice.fast_sinf(x)
    return cos_t, sin_t


# The sequence lengths are not specialized on: by default Triton compiles a variant for integer
# arguments that are multiples of 16 and assumes so, and with Tq and Tk multiples of 16 its alignment
# analysis (Triton 3.0 ... 3.9) took W + (m - n) with n = start + j, j = 0, 1, ... for 16-byte aligned
# and turned the dK/dV kernel's loads of the distance-weight table into 8-byte vector loads of
# misaligned addresses: "CUDA error: misaligned address" at T = 2048 on an H100, while T = 1000 ran.
# Without the assumption those loads stay 4-byte ones (as they were meant to: a table entry per score).
LENGTHS = ['Tq', 'Tk']


# -----------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_tile(acc, row_max, row_sum, q_a, q_p, sq, pos_m,
              K_base, V_base, W, stride_kt, stride_vt, start_n, Tk, amp_scale,
              D_A: tl.constexpr, D_P: tl.constexpr, D: tl.constexpr,
              BLOCK_DA: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, QUADRATIC: tl.constexpr, CAUSAL_MASK: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Fold the key block [start_n, start_n + BLOCK_N) into one query block's running softmax."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Key rows past the end exist only in blocks that straddle the diagonal (see the caller's loops):
    # the others load without the row test.
    k_a = _load_rows(K_base, offs_n, Tk, stride_kt, 0, BLOCK_DA, D_A, CAUSAL_MASK)
    k_p = _load_rows(K_base, offs_n, Tk, stride_kt, D_A, BLOCK_DP, D_P, CAUSAL_MASK)
    v = _load_rows(V_base, offs_n, Tk, stride_vt, 0, BLOCK_D, D, CAUSAL_MASK)

    # The two dot products, unscaled: their constant factors are folded into other operations below
    # (every multiply per score counts here, see _distance_weights).
    amp = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
    if QUADRATIC:  # a second, narrower matmul: the phase part of q times the phase part of k
        phi = tl.dot(q_p, tl.trans(k_p), input_precision=DOT_PREC)
    else:          # linear phase: a row sum plus a column sum, no matmul needed
        sk = tl.sum(k_p.to(tl.float32), axis=1)
        phi = sq[:, None] + sk[None, :]
    # Only blocks that straddle the diagonal (or run past the last key) need the mask: the caller
    # splits the key range so that the many blocks left of the diagonal skip this work.
    keep = (offs_n[None, :] <= pos_m[:, None]) & (offs_n[None, :] < Tk)
    # |m-n|^alpha / sqrt(d_P): row m, column n = start_n + j is at distance (m - start_n) - j
    w = _distance_weights(W + (pos_m - start_n).to(tl.int64), -tl.arange(0, BLOCK_N).to(tl.int64), keep,
                          CAUSAL_MASK)
    cos_a, _ = _cos_sin_2pi(w * phi)  # the phase, in turns
    s = amp * cos_a  # the score times sqrt(d_A)
    if CAUSAL_MASK:
        s = tl.where(keep, s, float('-inf'))

    # Online softmax, in log2 units: softmax is unchanged if every logit is scaled by log2(e) and exp
    # is replaced by exp2, a single fast instruction. amp_scale = log2(e) / sqrt(d_A) turns s into
    # such a logit; it is applied to the row max (one multiply per row) and inside the exponent's
    # multiply-add (free). New running max, rescale what was accumulated under the old max, add this
    # block. Every row sees key 0 in its first block, so row_max is finite from then on (no inf-inf).
    new_max = tl.maximum(row_max, tl.max(s, axis=1) * amp_scale)
    correction = tl.exp2(row_max - new_max)
    p = tl.exp2(s * amp_scale - new_max[:, None])
    row_sum = row_sum * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, new_max, row_sum


@triton.jit(do_not_specialize=LENGTHS)
def _tapa_fwd_kernel(Q, K, V, O, LSE, W,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     H, Tq, Tk, amp_scale,
                     D_A: tl.constexpr, D_P: tl.constexpr, D: tl.constexpr,
                     BLOCK_DA: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUADRATIC: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    # one program = one block of BLOCK_M queries of one (batch, head)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch * stride can exceed 2^31 on big tensors
    h = (pid_bh % H).to(tl.int64)
    Q_base = Q + b * stride_qb + h * stride_qh
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows 0..Tq-1 (rows >= Tq are padding)
    pos_m = offs_m + (Tk - Tq)                         # their absolute positions

    # The query block stays in registers for the whole loop, split into its two parts. Each part is
    # loaded zero-padded to a power of two, so both tl.dot calls see legal shapes (>= 16).
    q_a = _load_rows(Q_base, offs_m, Tq, stride_qt, 0, BLOCK_DA, D_A)
    q_p = _load_rows(Q_base, offs_m, Tq, stride_qt, D_A, BLOCK_DP, D_P)
    sq = tl.sum(q_p.to(tl.float32), axis=1)  # used by the linear phase only

    row_max = tl.full([BLOCK_M], float('-inf'), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key blocks, left to right. Causality: row m sees keys 0..m. With first = the position of this
    # block's first query, blocks ending at or before `first` are fully visible to every row (no
    # mask needed); the blocks from there up to the last row's position straddle the diagonal and
    # get masked; blocks beyond are never visited (that halves the work of causal attention).
    first = pid_m * BLOCK_M + (Tk - Tq)
    unmasked_end = ((first + 1) // BLOCK_N) * BLOCK_N
    end = tl.minimum(first + BLOCK_M, Tk)
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, row_max, row_sum = _fwd_tile(acc, row_max, row_sum, q_a, q_p, sq, pos_m,
                                          K_base, V_base, W, stride_kt, stride_vt, start_n, Tk, amp_scale,
                                          D_A, D_P, D, BLOCK_DA, BLOCK_DP, BLOCK_D, BLOCK_N, QUADRATIC,
                                          False, DOT_PREC)
    for start_n in range(unmasked_end, end, BLOCK_N):
        acc, row_max, row_sum = _fwd_tile(acc, row_max, row_sum, q_a, q_p, sq, pos_m,
                                          K_base, V_base, W, stride_kt, stride_vt, start_n, Tk, amp_scale,
                                          D_A, D_P, D, BLOCK_DA, BLOCK_DP, BLOCK_D, BLOCK_N, QUADRATIC,
                                          True, DOT_PREC)

    # Normalize once at the end (FlashAttention-2 defers the division), and save the log-sum-exp
    # (base 2, matching the exp2 logits) so the backward can rebuild probabilities as exp2(s - lse).
    acc = acc / row_sum[:, None]
    _store_rows(O + b * stride_ob + h * stride_oh, acc, offs_m, Tq, stride_ot, 0, BLOCK_D, D)
    tl.store(LSE + pid_bh * Tq + offs_m, row_max + tl.log2(row_sum), mask=offs_m < Tq)


# -----------------------------------------------------------------------------
# Backward
#
# With P = softmax probabilities, dO the incoming gradient and Delta[m] = sum_d dO[m,d] * O[m,d]:
#   dV     = P^T @ dO
#   dS     = P * (dO @ V^T - Delta)                      (the softmax backward, FlashAttention's form)
# and through S = a / sqrt(d_A) * cos(2*pi * w * b), with the raw dot products a = q_A.k_A and
# b = q_P.k_P (linear phase: b = sum(q_P) + sum(k_P)) and w = |m-n|^alpha / sqrt(d_P):
#   dS/da  = cos(angle) / sqrt(d_A)
#   dS/db  = -a * sin(angle) * w * 2*pi / sqrt(d_A)
#   dq_A = (dS * dS/da) @ k_A          dk_A = (dS * dS/da)^T @ q_A
#   quadratic: dq_P = (dS * dS/db) @ k_P,   dk_P = (dS * dS/db)^T @ q_P
#   linear:    every phase dim of q[m] gets the row sum of dS * dS/db, of k[n] the column sum
# The constant factors 1/sqrt(d_A) and -2*pi/sqrt(d_A) multiply the accumulated dQ and dK once at the
# end, not every score.


@triton.jit
def _bwd_elementwise(amp, phi, w, keep, lse, delta, dp, amp_scale, CAUSAL_MASK: tl.constexpr):
    """The elementwise heart of the backward, for one recomputed tile in either orientation
    (queries x keys in the dQ kernel, keys x queries in the dK/dV kernel; lse and delta come in
    broadcast to the tile). Inputs: the raw dot products amp = q_A.k_A and phi = q_P.k_P (or the
    linear phase's sum), the distance weights w, as in the forward, so P below matches the
    probabilities the forward used; dp = dO.v.
    Returns P and the gradients w.r.t. the two raw dot products without their constant factors
    (see above): g_amp for q_A.k_A, g_phase for q_P.k_P (or, linear phase, for the sums)."""
    cos_a, sin_a = _cos_sin_2pi(w * phi)
    s = amp * cos_a
    if CAUSAL_MASK:
        s = tl.where(keep, s, float('-inf'))
    p = tl.exp2(s * amp_scale - lse)  # masked entries: exp2(-inf) = 0, so their dS is 0 below
    ds = p * (dp - delta)
    g_amp = ds * cos_a
    g_phase = (ds * amp) * (sin_a * w)
    return p, g_amp, g_phase


@triton.jit
def _dot_phase_grad(g, x, DOT_PREC: tl.constexpr, PHASE_GRAD_F32: tl.constexpr):
    """g @ x for a float32 phase-gradient tile g and q_P or k_P: in x's dtype, except that float16
    inputs take float32 operands (see _launch_config: float16 cannot hold large phase gradients)."""
    if PHASE_GRAD_F32:
        return tl.dot(g, x.to(tl.float32), input_precision=DOT_PREC)
    else:
        return tl.dot(g.to(x.dtype), x, input_precision=DOT_PREC)


@triton.jit
def _store_qk_grad(ptr, g_amp, g_phase, g_phase_sum, rows, n_rows, stride_row, amp_scale,
                   D_A: tl.constexpr, D_P: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DP: tl.constexpr,
                   QUADRATIC: tl.constexpr):
    """Store dK (or dQ) of a block of rows from what the loop accumulated without the constant
    factors (see above): g_amp for the amplitude dims, g_phase (quadratic) or the per-row sum
    g_phase_sum (linear: the same value for every phase dim) for the phase dims. The factors:
    1/sqrt(d_A) = amp_scale * ln 2, and -2*pi/sqrt(d_A)."""
    _store_rows(ptr, g_amp * (amp_scale * LN2), rows, n_rows, stride_row, 0, BLOCK_DA, D_A)
    if not QUADRATIC:
        g_phase += g_phase_sum[:, None]
    _store_rows(ptr, g_phase * (amp_scale * LN2 * -TWO_PI), rows, n_rows, stride_row, D_A, BLOCK_DP, D_P)


@triton.jit
def _dkdv_step(dk_a, dk_p, dsk, dv, k_a, k_p, sk, v, start_n, start_m, Q_base, DO_base, LSE_base, DELTA_base,
               DQ_base, W, stride_qt, stride_dot, stride_dqt, Tq, Tk, shift, amp_scale,
               D_A: tl.constexpr, D_P: tl.constexpr, D: tl.constexpr,
               BLOCK_DA: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUADRATIC: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, ROW_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
               PHASE_GRAD_F32: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Add the contribution of the query block [start_m, start_m + BLOCK_M) to one key block's dK, dV
    (and, with ATOMIC_DQ, add this tile's share of the queries' dQ to a float32 buffer).
    The tile is built transposed, keys x queries (as in the Triton fused-attention tutorial), so
    that dV += P^T dO and dK += dS^T q are plain matmuls of the tile, with no transpose of it."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # ROW_MASK: this block may have query rows past the end (see the caller); they load as zeros
    q_a = _load_rows(Q_base, offs_m, Tq, stride_qt, 0, BLOCK_DA, D_A, ROW_MASK)
    q_p = _load_rows(Q_base, offs_m, Tq, stride_qt, D_A, BLOCK_DP, D_P, ROW_MASK)
    do = _load_rows(DO_base, offs_m, Tq, stride_dot, 0, BLOCK_D, D, ROW_MASK)
    if ROW_MASK:
        lse = tl.load(LSE_base + offs_m, mask=offs_m < Tq, other=0.0)
        delta = tl.load(DELTA_base + offs_m, mask=offs_m < Tq, other=0.0)
    else:  # int64 offsets from the block's start: their constant parts fold into the loads (as in
        # _distance_weights), where int32 ones cost a 64-bit address computation per value
        lse = tl.load(LSE_base + start_m + tl.arange(0, BLOCK_M).to(tl.int64))
        delta = tl.load(DELTA_base + start_m + tl.arange(0, BLOCK_M).to(tl.int64))

    amp_t = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PREC)
    if QUADRATIC:
        phi_t = tl.dot(k_p, tl.trans(q_p), input_precision=DOT_PREC)
    else:
        sq = tl.sum(q_p.to(tl.float32), axis=1)
        # "+ amp_t * 0": gives phi the register layout of the matmul output amp_t. Without it Triton
        # keeps phi in the layout of the broadcast sums and computes the elementwise chain below
        # twice, once per layout: 76 instead of 58 instructions per score in this kernel's main loop
        # (bfloat16, head dim 64, sm_90; `python tests/test_tapa_triton_compile.py --worker --sass`).
        phi_t = sk[:, None] + sq[None, :] + amp_t * 0.0
    pos_m = offs_m + shift
    keep_t = (offs_n[:, None] <= pos_m[None, :]) & (offs_n[:, None] < Tk)
    # row n = start_n + j (a key), column m = pos_m[0] + i (a query) are at distance
    # (pos_m[0] - start_n) - j + i. Written with fresh aranges (not the caller's offs_n, which reach
    # here as opaque registers), the compiler sees the whole tile as one address plus constants that
    # fold into the loads, instead of a 64-bit addition per row: -1.1 instructions per score.
    w_t = _distance_weights(W + (start_m + shift - start_n) - tl.arange(0, BLOCK_N).to(tl.int64),
                            tl.arange(0, BLOCK_M).to(tl.int64), keep_t, CAUSAL_MASK)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    p_t, g_amp_t, g_phase_t = _bwd_elementwise(amp_t, phi_t, w_t, keep_t, lse[None, :], delta[None, :],
                                               dp_t, amp_scale, CAUSAL_MASK)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dk_a += tl.dot(g_amp_t.to(q_a.dtype), q_a, input_precision=DOT_PREC)
    if QUADRATIC:
        dk_p += _dot_phase_grad(g_phase_t, q_p, DOT_PREC, PHASE_GRAD_F32)
    else:
        dsk += tl.sum(g_phase_t, axis=1)
    if ATOMIC_DQ:
        # The single-pass backward: dQ from this same tile (dQ += dS k, through the transposed tile),
        # added with atomics to a float32 buffer that every key block of these queries adds to. That
        # saves the dQ kernel, which would recompute the whole elementwise chain of every tile.
        # (The constant factors of dQ are applied to the whole buffer afterwards.)
        _atomic_add_rows(DQ_base, tl.dot(tl.trans(g_amp_t.to(k_a.dtype)), k_a, input_precision=DOT_PREC),
                         offs_m, Tq, stride_dqt, 0, BLOCK_DA, D_A, ROW_MASK)
        if QUADRATIC:
            dq_p = _dot_phase_grad(tl.trans(g_phase_t), k_p, DOT_PREC, PHASE_GRAD_F32)
        else:  # the same value for every phase dim of query m: the column sum over these keys
            dq_p = tl.broadcast_to(tl.sum(g_phase_t, axis=0)[:, None], (BLOCK_M, BLOCK_DP))
        _atomic_add_rows(DQ_base, dq_p, offs_m, Tq, stride_dqt, D_A, BLOCK_DP, D_P, ROW_MASK)
    return dk_a, dk_p, dsk, dv


@triton.jit(do_not_specialize=LENGTHS)
def _tapa_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, W, DK, DV, DQ,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          stride_dqb, stride_dqh, stride_dqt,
                          H, Tq, Tk, amp_scale,
                          D_A: tl.constexpr, D_P: tl.constexpr, D: tl.constexpr,
                          BLOCK_DA: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUADRATIC: tl.constexpr,
                          DOT_PREC: tl.constexpr, PHASE_GRAD_F32: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                          TQ_TAIL: tl.constexpr):
    # one program = one block of BLOCK_N keys of one (batch, head); it walks over the query blocks
    # that can see these keys and accumulates dK and dV in registers
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q_base = Q + b * stride_qb + h * stride_qh
    DO_base = DO + b * stride_dob + h * stride_doh
    LSE_base = LSE + pid_bh * Tq
    DELTA_base = DELTA + pid_bh * Tq
    DQ_base = DQ + b * stride_dqb + h * stride_dqh  # used with ATOMIC_DQ only

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_a = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, Tk, stride_kt, 0, BLOCK_DA, D_A)
    k_p = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, Tk, stride_kt, D_A, BLOCK_DP, D_P)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, Tk, stride_vt, 0, BLOCK_D, D)
    sk = tl.sum(k_p.to(tl.float32), axis=1)  # linear phase only

    dk_a = tl.zeros([BLOCK_N, BLOCK_DA], dtype=tl.float32)
    dk_p = tl.zeros([BLOCK_N, BLOCK_DP], dtype=tl.float32)  # quadratic phase
    dsk = tl.zeros([BLOCK_N], dtype=tl.float32)             # linear phase
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query row i (position i + shift) sees key n when i + shift >= n. The first query block with a
    # row that sees any of our keys starts at the block holding row start_n - shift; until the rows
    # reach our last key, start_n + BLOCK_N - 1, tiles straddle the diagonal and need the mask; every
    # later query block sees all our keys. Blocks above the diagonal are skipped entirely.
    # (Query rows past Tq in the last block load as zeros with dO = 0 and Delta = 0, so they add
    # exactly nothing; key rows past Tk are computed but never stored: no extra mask needed. Such
    # query rows exist only when Tq is not a multiple of BLOCK_M, TQ_TAIL: otherwise the loads of the
    # main loop skip the row test.)
    shift = Tk - Tq
    lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
    masked_end = (tl.maximum(start_n + BLOCK_N - 1 - shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    masked_end = tl.maximum(tl.minimum(masked_end, Tq), lo)
    for start_m in range(lo, masked_end, BLOCK_M):
        dk_a, dk_p, dsk, dv = _dkdv_step(dk_a, dk_p, dsk, dv, k_a, k_p, sk, v, start_n, start_m,
                                         Q_base, DO_base, LSE_base, DELTA_base, DQ_base, W, stride_qt,
                                         stride_dot, stride_dqt, Tq, Tk, shift, amp_scale,
                                         D_A, D_P, D, BLOCK_DA, BLOCK_DP, BLOCK_D, BLOCK_M, BLOCK_N,
                                         QUADRATIC, True, True, DOT_PREC, PHASE_GRAD_F32, ATOMIC_DQ)
    for start_m in range(masked_end, Tq, BLOCK_M):
        dk_a, dk_p, dsk, dv = _dkdv_step(dk_a, dk_p, dsk, dv, k_a, k_p, sk, v, start_n, start_m,
                                         Q_base, DO_base, LSE_base, DELTA_base, DQ_base, W, stride_qt,
                                         stride_dot, stride_dqt, Tq, Tk, shift, amp_scale,
                                         D_A, D_P, D, BLOCK_DA, BLOCK_DP, BLOCK_D, BLOCK_M, BLOCK_N,
                                         QUADRATIC, False, TQ_TAIL, DOT_PREC, PHASE_GRAD_F32, ATOMIC_DQ)

    _store_qk_grad(DK + b * stride_dkb + h * stride_dkh, dk_a, dk_p, dsk, offs_n, Tk, stride_dkt, amp_scale,
                   D_A, D_P, BLOCK_DA, BLOCK_DP, QUADRATIC)
    _store_rows(DV + b * stride_dvb + h * stride_dvh, dv, offs_n, Tk, stride_dvt, 0, BLOCK_D, D)


@triton.jit
def _dq_step(dq_a, dq_p, dsq, q_a, q_p, sq, do, lse, delta, pos_m, start_n, K_base, V_base, W,
             stride_kt, stride_vt, Tk, amp_scale,
             D_A: tl.constexpr, D_P: tl.constexpr, D: tl.constexpr,
             BLOCK_DA: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, QUADRATIC: tl.constexpr, CAUSAL_MASK: tl.constexpr,
             DOT_PREC: tl.constexpr, PHASE_GRAD_F32: tl.constexpr):
    """Add the contribution of the key block [start_n, start_n + BLOCK_N) to one query block's dQ."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Key rows past the end exist only in blocks that straddle the diagonal (see the caller's loops):
    # the others load without the row test.
    k_a = _load_rows(K_base, offs_n, Tk, stride_kt, 0, BLOCK_DA, D_A, CAUSAL_MASK)
    k_p = _load_rows(K_base, offs_n, Tk, stride_kt, D_A, BLOCK_DP, D_P, CAUSAL_MASK)
    v = _load_rows(V_base, offs_n, Tk, stride_vt, 0, BLOCK_D, D, CAUSAL_MASK)
    amp = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
    if QUADRATIC:
        phi = tl.dot(q_p, tl.trans(k_p), input_precision=DOT_PREC)
    else:
        sk = tl.sum(k_p.to(tl.float32), axis=1)
        phi = sq[:, None] + sk[None, :] + amp * 0.0  # "+ amp * 0": see _dkdv_step
    keep = (offs_n[None, :] <= pos_m[:, None]) & (offs_n[None, :] < Tk)
    w = _distance_weights(W + (pos_m - start_n).to(tl.int64), -tl.arange(0, BLOCK_N).to(tl.int64), keep,
                          CAUSAL_MASK)  # as in the forward
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    p, g_amp, g_phase = _bwd_elementwise(amp, phi, w, keep, lse[:, None], delta[:, None], dp, amp_scale,
                                         CAUSAL_MASK)
    dq_a += tl.dot(g_amp.to(k_a.dtype), k_a, input_precision=DOT_PREC)
    if QUADRATIC:
        dq_p += _dot_phase_grad(g_phase, k_p, DOT_PREC, PHASE_GRAD_F32)
    else:
        dsq += tl.sum(g_phase, axis=1)
    return dq_a, dq_p, dsq


@triton.jit(do_not_specialize=LENGTHS)
def _tapa_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, W, DQ,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        H, Tq, Tk, amp_scale,
                        D_A: tl.constexpr, D_P: tl.constexpr, D: tl.constexpr,
                        BLOCK_DA: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUADRATIC: tl.constexpr,
                        DOT_PREC: tl.constexpr, PHASE_GRAD_F32: tl.constexpr):
    # one program = one block of BLOCK_M queries; it walks over the visible key blocks (the same
    # ranges as the forward) and accumulates dQ in registers
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q_base = Q + b * stride_qb + h * stride_qh
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_m = offs_m + (Tk - Tq)
    q_a = _load_rows(Q_base, offs_m, Tq, stride_qt, 0, BLOCK_DA, D_A)
    q_p = _load_rows(Q_base, offs_m, Tq, stride_qt, D_A, BLOCK_DP, D_P)
    sq = tl.sum(q_p.to(tl.float32), axis=1)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, Tq, stride_dot, 0, BLOCK_D, D)
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)

    dq_a = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
    dq_p = tl.zeros([BLOCK_M, BLOCK_DP], dtype=tl.float32)  # quadratic phase
    dsq = tl.zeros([BLOCK_M], dtype=tl.float32)             # linear phase

    first = pid_m * BLOCK_M + (Tk - Tq)
    unmasked_end = ((first + 1) // BLOCK_N) * BLOCK_N
    end = tl.minimum(first + BLOCK_M, Tk)
    for start_n in range(0, unmasked_end, BLOCK_N):
        dq_a, dq_p, dsq = _dq_step(dq_a, dq_p, dsq, q_a, q_p, sq, do, lse, delta, pos_m, start_n,
                                   K_base, V_base, W, stride_kt, stride_vt, Tk, amp_scale,
                                   D_A, D_P, D, BLOCK_DA, BLOCK_DP, BLOCK_D, BLOCK_N, QUADRATIC, False,
                                   DOT_PREC, PHASE_GRAD_F32)
    for start_n in range(unmasked_end, end, BLOCK_N):
        dq_a, dq_p, dsq = _dq_step(dq_a, dq_p, dsq, q_a, q_p, sq, do, lse, delta, pos_m, start_n,
                                   K_base, V_base, W, stride_kt, stride_vt, Tk, amp_scale,
                                   D_A, D_P, D, BLOCK_DA, BLOCK_DP, BLOCK_D, BLOCK_N, QUADRATIC, True,
                                   DOT_PREC, PHASE_GRAD_F32)

    _store_qk_grad(DQ + b * stride_dqb + h * stride_dqh, dq_a, dq_p, dsq, offs_m, Tq, stride_dqt, amp_scale,
                   D_A, D_P, BLOCK_DA, BLOCK_DP, QUADRATIC)


# -----------------------------------------------------------------------------
# The PyTorch side: checks, launch configuration, autograd


def _pow2(n):
    """Next power of two, at least 16 (tl.dot's smallest inner dimension)."""
    return max(16, triton.next_power_of_2(n))


def _tile_sizes(dtype, block_d, capability, single_pass=False):
    """(BLOCK_M, BLOCK_N, num_warps) of each kernel: BLOCK_M query rows x BLOCK_N key columns per tile.
      forward   one program per BLOCK_M queries, streaming keys BLOCK_N at a time;
      dK/dV     one program per BLOCK_N keys, streaming queries BLOCK_M at a time;
      dQ        one program per BLOCK_M queries, streaming keys BLOCK_N at a time.
    The block a program keeps is the larger one: it is reused across the whole sweep. TAPA keeps more
    tiles alive than FlashAttention (amplitude, phase, distance weight, cos, and in the backward sin
    and two gradients), so its tiles are smaller. The 16-bit tiles for head dims 64 and 128 are the
    fastest of experiments/triton_tiles.py's candidates on an H200 (Hopper), timed with an earlier
    version of the kernels (e.g. 4 warps instead of 8: -25% for dK/dV at head dim 64, -50% forward
    and -30% dQ at 128); the rest were picked by compiling for sm_75 ... sm_90 and reading ptxas's
    register report and the instructions per score, not by timing (float32 at head dim 128: 4 warps,
    40% fewer instructions per score than 8). `python tests/test_tapa_triton_compile.py --worker --all
    --sass` prints both. With Triton 3.9 and the alignment Triton assumes at run time, at head dims 64
    and 128 on sm_80 ... sm_120 bfloat16 and float16 spill at most 32 bytes (dK/dV at head dim 128 on
    sm_90; 24 in linear dK/dV on sm_120; 4 in float16 dQ on sm_80; nothing elsewhere), but the single
    pass's dK/dV up to 180 (412 with its wider Hopper tiles, see below), float32 up to 148 bytes (dQ,
    head dim 128). Every kernel fits the consumer cards' 99 KB of shared memory (at most 89 KB, float32
    at head dim 256); on Turing (64 KB) all but float32 above head dim 128, which no tiles here fit
    (turing_problem)."""
    if capability < (8, 0):  # Turing (e.g. T4): Triton lowers tl.dot to scalar FMA there, small tiles
        return (dict(fwd=(32, 32, 4), dkdv=(16, 32, 4), dq=(32, 16, 4)) if block_d <= 64 else
                dict(fwd=(32, 32, 8), dkdv=(16, 16, 8), dq=(16, 16, 8)))
    if dtype == torch.float32:  # twice the registers and shared memory per tile, 3-pass matmuls
        if block_d > 128:  # these need 68-91 KB of shared memory; the tiles below, 143-158 KB at head
            return dict(fwd=(16, 16, 4), dkdv=(16, 16, 4), dq=(16, 16, 4))  # dim 256 (RTX cards: 99)
        return dict(fwd=(32, 32, 4), dkdv=(16, 16, 4), dq=(32, 16, 4))
    hopper = capability[0] == 9
    # single_pass: the dK/dV kernel of the single-pass backward (deterministic=False), which also
    # multiplies out dQ and adds it with atomics. Wider key blocks mean fewer atomic additions per
    # score (BLOCK_M * D per tile): on an H100 (bfloat16, L = 8192) its backward took 0.86x the time of
    # the two-kernel one with 64 x 128 tiles and 8 warps, 0.93x with 32 x 64 (head dim 64); 0.92x with
    # 32 x 128 and 8 warps at head dim 128, where the two-kernel dK/dV has 32 x 64. Measured on
    # Hopper in bfloat16 only. ptxas spills 0-412 bytes with these tiles there (Triton 3.6-3.9, both
    # phases; the timed build: 272 at head dim 64, 16 at 128); float16, whose phase-gradient matmuls
    # take float32 operands, spills 80-584 and was not timed: it keeps the two-kernel dK/dV's tiles,
    # as do the other GPUs.
    wide_single = single_pass and hopper and dtype == torch.bfloat16
    if block_d <= 64:
        dkdv = (64, 128, 8) if wide_single else (32, 64, 4)
        tiles = dict(fwd=(64, 64, 4), dkdv=dkdv, dq=(64, 32, 4))
    elif block_d <= 128:
        # Hopper (wgmma): dK/dV 32 x 64 took 0.77x the time of 32 x 32 on an H100 (bfloat16, L = 8192);
        # the other GPUs' compilers spill 0.2-9 KB with it, so they keep 32 x 32
        dkdv = (32, 128, 8) if wide_single else (32, 64, 4) if hopper else (32, 32, 4)
        tiles = dict(fwd=(64, 64, 4), dkdv=dkdv, dq=(64, 32, 4))
    else:
        tiles = dict(fwd=(64, 32, 8), dkdv=(16, 16, 4), dq=(32, 16, 4))
    if hopper and TRITON_VERSION < (3, 2):
        # Triton 3.0 and 3.1 (those of torch 2.4 and 2.5) crash (a segmentation fault, or an abort in
        # LLVM translation) compiling two things for Hopper; 3.2 on compile both. (1) The forward at
        # head dims above 64 whenever its P @ V becomes a wgmma, i.e. with BLOCK_M >= 64: 32-row
        # blocks use the older mma instructions, which they compile. (2) The float16 single pass's
        # dK/dV kernel with 32 x 64 tiles (16 x 64 too) in the quadratic phase (this function is not
        # told the phase: both take the workaround): 64 x 64 and 32 x 32 compile, and of those two
        # 64 x 64 was the faster in bfloat16 at head dim 64 on the H100, 32 x 32 at head dim 128 (not
        # timed in float16).
        if block_d > 64:
            tiles['fwd'] = (32, 64, 4) if block_d <= 128 else (32, 32, 8)
        if single_pass and dtype == torch.float16 and tiles['dkdv'] == (32, 64, 4):
            tiles['dkdv'] = (64, 64, 4) if block_d <= 64 else (32, 32, 4)
    return tiles


def _launch_config(q, d_amp, block_m, block_n, num_warps, num_stages, deterministic=True, capability=None):
    """(constants, launch options) of the three kernels for q's dtype and head dim, on q's GPU or on
    the GPU `capability` names, e.g. (9, 0) (the compile test builds for GPUs it does not have).
    deterministic=None: see tapa_attention_triton."""
    D = q.size(-1)
    dtype = q.dtype
    if capability is None:
        capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else (8, 0)
    if deterministic is None:
        deterministic = not single_pass_is_faster(capability, dtype, D)
        if not deterministic and torch.are_deterministic_algorithms_enabled():
            if torch.is_deterministic_algorithms_warn_only_enabled():  # as PyTorch's flash backward
                warnings.warn("tapa_attention_triton defaults to a non-deterministic backward on this GPU. To "
                              "enable determinism call torch.use_deterministic_algorithms(True, warn_only=False) "
                              "or pass deterministic=True.")
            else:
                deterministic = True
    cfg = dict(
        D_A=d_amp, D_P=D - d_amp, D=D,
        BLOCK_DA=_pow2(d_amp), BLOCK_DP=_pow2(D - d_amp), BLOCK_D=_pow2(D),
        # float32 inputs: float32-accurate matmuls, not plain TF32 -- the phase angle multiplies the
        # q_P.k_P error by 2*pi*|m-n|^alpha, and TF32's 10-bit mantissa is too coarse for that.
        # "tf32x3" (three TF32 tensor-core passes, float32 accuracy) on the GPU, "ieee" in the
        # interpreter. Otherwise None = the backend's default, which only matters for the float32
        # phase-gradient matmuls of float16 inputs (TF32 on NVIDIA).
        DOT_PREC=('ieee' if _INTERPRETED else 'tf32x3') if dtype == torch.float32 else None,
        # float16 inputs: the phase gradient carries a factor 2*pi*|m-n|^alpha * A that can exceed
        # float16's range (65504) at long distances, so those two backward matmuls take float32
        # operands (TF32 on the tensor cores: float16's precision, float32's range). bfloat16 already
        # has float32's range.
        PHASE_GRAD_F32=(dtype == torch.float16),
        # deterministic=False: the single-pass backward, see tapa_attention_triton
        ATOMIC_DQ=not deterministic,
    )
    tiles = _tile_sizes(dtype, cfg['BLOCK_D'], capability, single_pass=not deterministic)
    launch = {}
    for name, (bm, bn, nw) in tiles.items():
        # enable_fp_fusion: a multiply and an add become one fused multiply-add (the default up to
        # Triton 3.9; 3.10 turns it off): a third of the elementwise instructions here are such pairs
        launch[name] = dict(BLOCK_M=block_m or bm, BLOCK_N=block_n or bn,
                            num_warps=num_warps or nw, num_stages=num_stages or 2, enable_fp_fusion=True)
        if _INTERPRETED:  # the interpreter ignores these (and warns about some)
            for option in ('num_warps', 'num_stages', 'enable_fp_fusion'):
                launch[name].pop(option)
    return cfg, launch


def single_pass_is_faster(capability, dtype, head_dim):
    """Where the single-pass backward was measured faster than the two-kernel one, and so is the
    default when PyTorch may be non-deterministic: Hopper GPUs (an H100), bfloat16, head dims 64 to 128
    (measured at 64 and 128, see _tile_sizes). Not measured: float16, float32, other head dims, other
    GPUs."""
    return capability[0] == 9 and dtype == torch.bfloat16 and 64 <= head_dim <= 128


def _constants(kernel, cfg):
    # each kernel gets the constants it declares (the forward has no PHASE_GRAD_F32): Triton up to at
    # least 3.6 rejects a keyword argument a kernel does not declare
    return {name: value for name, value in cfg.items() if name in kernel.arg_names}


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _on_device(t):
    # launch on the tensor's GPU even when another one is the current device
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# The tables of distance weights, W[d] = d^alpha / sqrt(d_P) (see _distance_weights), one per device,
# alpha and d_P: a model calls attention with the same settings in every layer and step, so each is
# built once (a longer sequence replaces it with a longer one; a table's start is the shorter table).
_WEIGHT_TABLES = {}


def _distance_table(length, alpha, d_phase, device):
    """W[d] = d^alpha / sqrt(d_phase) for d = 0 .. length-1 or more, float32 (computed in float64, so
    each entry is correctly rounded; 0^alpha = 0 for alpha > 0)."""
    key = (str(device), alpha, d_phase)
    table = _WEIGHT_TABLES.get(key)
    if table is None or table.numel() < length:
        # a normal tensor even when first built under torch.inference_mode(): a later training step
        # saves it for its backward, which autograd refuses for an inference-mode tensor
        with torch.inference_mode(False):
            d = torch.arange(length, dtype=torch.float64, device=device)
            table = (d ** alpha / math.sqrt(d_phase)).float()
        _WEIGHT_TABLES[key] = table
    return table


class _TapaAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, alpha, d_amp, quadratic, cfg, launch):
        B, H, Tq, D = q.shape
        Tk = k.size(2)
        o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
        amp_scale = LOG2E / math.sqrt(d_amp)  # amplitude logits in log2 units, for exp2
        # Distances reach Tk - 1, and the padding rows of a last, partial query block (computed, never
        # stored) go up to one block further: the table covers those too.
        longest_block = max(max(c['BLOCK_M'], c['BLOCK_N']) for c in launch.values())
        table = _distance_table(Tk + longest_block, alpha, D - d_amp, q.device)
        grid = (triton.cdiv(Tq, launch['fwd']['BLOCK_M']), B * H)
        with _on_device(q):
            _tapa_fwd_kernel[grid](q, k, v, o, lse, table,
                                   *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                                   H, Tq, Tk, amp_scale, QUADRATIC=quadratic,
                                   **_constants(_tapa_fwd_kernel, cfg), **launch['fwd'])
        ctx.save_for_backward(q, k, v, o, lse, table)
        ctx.d_amp, ctx.amp_scale = d_amp, amp_scale
        ctx.quadratic, ctx.cfg, ctx.launch = quadratic, cfg, launch
        return o

    @staticmethod
    def backward(ctx, do):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is wanted
            raise RuntimeError("tapa_attention_triton has no second derivative (its backward kernels are not "
                               "differentiable); use attn_impl='naive' for create_graph=True")
        q, k, v, o, lse, table = ctx.saved_tensors
        B, H, Tq, D = q.shape
        Tk = k.size(2)
        if do.stride(-1) != 1:
            do = do.contiguous()
        # Delta[m] = sum_d dO[m,d] * O[m,d] = sum_n P[m,n] * dP[m,n], the softmax backward's row term.
        # One small elementwise pass; PyTorch does it fine.
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dk = torch.empty((B, H, Tk, D), device=k.device, dtype=k.dtype)
        dv = torch.empty((B, H, Tk, D), device=v.device, dtype=v.dtype)
        atomic = ctx.cfg['ATOMIC_DQ']  # single pass: the dK/dV kernel also adds dQ, in float32
        dq = torch.zeros((B, H, Tq, D), device=q.device, dtype=torch.float32) if atomic else \
            torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
        launch = ctx.launch
        with _on_device(q):
            _tapa_bwd_dkdv_kernel[(triton.cdiv(Tk, launch['dkdv']['BLOCK_N']), B * H)](
                q, k, v, do, lse, delta, table, dk, dv, dq,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                *_strides(dq), H, Tq, Tk, ctx.amp_scale, QUADRATIC=ctx.quadratic,
                TQ_TAIL=Tq % launch['dkdv']['BLOCK_M'] != 0,
                **_constants(_tapa_bwd_dkdv_kernel, ctx.cfg), **launch['dkdv'])
            if not atomic:
                _tapa_bwd_dq_kernel[(triton.cdiv(Tq, launch['dq']['BLOCK_M']), B * H)](
                    q, k, v, do, lse, delta, table, dq,
                    *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                    H, Tq, Tk, ctx.amp_scale, QUADRATIC=ctx.quadratic,
                    **_constants(_tapa_bwd_dq_kernel, ctx.cfg), **launch['dq'])
        if atomic:  # the constant factors of dQ (the dQ kernel applies them itself): see "Backward"
            grad_scale = torch.full((D,), 1 / math.sqrt(ctx.d_amp), device=dq.device)
            grad_scale[ctx.d_amp:] *= -2 * math.pi
            dq.mul_(grad_scale)  # in place: no second float32 copy of dQ
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def tapa_attention_triton(q, k, v, alpha, theta, phase='quadratic', *, deterministic=None,
                          block_m=None, block_n=None, num_warps=None, num_stages=None):
    """Fused causal TAPA attention. q (B, H, Tq, D), k and v (B, H, Tk, D), Tq <= Tk, the queries
    being the last Tq positions. float16, bfloat16 or float32 (all three the same), CUDA tensors
    (or CPU tensors under TRITON_INTERPRET=1). Returns (B, H, Tq, D) in q's dtype; differentiable
    in q, k and v. block_m / block_n / num_warps / num_stages override the launch configuration
    (block sizes: powers of two >= 16).
    deterministic=False: a single-pass backward, as FlashAttention-2's CUDA code does it. The dK/dV
    kernel also adds each tile's share of dQ to a float32 buffer with atomics, instead of a second
    kernel that recomputes every tile's elementwise work, which is most of the backward's time. The
    order of those additions varies, so dQ can differ between runs by float32 rounding. On an H100
    (bfloat16, L = 8192) it took 0.86x the time of the two-kernel backward at head dim 64, 0.92x at
    128 (experiments/triton_tiles.py times both).
    deterministic=True: the two-kernel backward, the same bits on every run.
    deterministic=None (the default): the single pass where single_pass_is_faster() (Hopper, bfloat16,
    head dims 64 to 128) unless torch.use_deterministic_algorithms(True) is on; otherwise the two
    kernels. That is PyTorch's own rule for its FlashAttention backward, which also adds dQ with
    atomics unless that mode is on (with warn_only=True both stay non-deterministic, and warn). The
    choice is made when the forward runs (the backward is launched with what it chose)."""
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"tapa_attention_triton needs Triton (pip install triton; Linux + CUDA GPU): "
                           f"importing it failed with {_TRITON_IMPORT_ERROR!r}. Use attn_impl='chunked' instead.")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("tapa_attention_triton: q, k and v must be torch tensors")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"tapa_attention_triton: q, k, v must be 4-D (B, H, T, D); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    Tk = k.size(2)
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.size(3) != D:
        raise ValueError(f"tapa_attention_triton: expected k and v of shape (B, H, Tk, D) = "
                         f"({B}, {H}, Tk, {D}) matching q {tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Tq > Tk:
        raise ValueError(f"tapa_attention_triton: {Tq} queries but only {Tk} keys; the queries must be "
                         f"the last Tq of the Tk positions (Tq <= Tk)")
    if Tq == 0 or B * H == 0:
        raise ValueError(f"tapa_attention_triton: empty input, q {tuple(q.shape)}")
    if not HEAD_DIMS[0] <= D <= HEAD_DIMS[1]:
        raise ValueError(f"tapa_attention_triton: head dim {D} is outside the supported "
                         f"{HEAD_DIMS[0]}..{HEAD_DIMS[1]}; use attn_impl='chunked' for other sizes")
    d_amp, _ = tapa_split(D, theta)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"tapa_attention_triton: alpha={alpha!r} must be a finite number > 0")
    if phase not in ('quadratic', 'linear'):
        raise ValueError(f"tapa_attention_triton: phase={phase!r} must be 'quadratic' or 'linear'")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"tapa_attention_triton: q, k, v must share one dtype among float16, bfloat16, "
                        f"float32; got {q.dtype}, {k.dtype}, {v.dtype} (float64: use attn_impl='naive')")
    if not (q.device == k.device == v.device):
        raise ValueError(f"tapa_attention_triton: q, k, v are on different devices "
                         f"({q.device}, {k.device}, {v.device})")
    for bs in (block_m, block_n):
        if bs is not None and (bs < 16 or bs & (bs - 1)):
            raise ValueError(f"tapa_attention_triton: block sizes must be powers of two >= 16, got {bs}")
    if not q.is_cuda and not _INTERPRETED:
        raise ValueError(f"tapa_attention_triton: tensors are on {q.device}, but the fused kernel runs on "
                         f"CUDA GPUs only (to run it slowly on CPU, set TRITON_INTERPRET=1 before importing "
                         f"tapa_triton; or use attn_impl='chunked')")
    problem = turing_problem(D, q.dtype, q.device)
    if problem:
        raise ValueError(f"tapa_attention_triton on {torch.cuda.get_device_name(q.device)}: {problem}")
    if q.is_cuda and _INTERPRETED:
        raise ValueError("tapa_attention_triton: TRITON_INTERPRET=1 was set when tapa_triton was imported, "
                         "so the kernels run in Triton's CPU interpreter; pass CPU tensors, or unset it")
    # the kernels want unit stride along the head dim (any other layout is fine)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if deterministic is not None:
        deterministic = bool(deterministic)
    cfg, launch = _launch_config(q, d_amp, block_m, block_n, num_warps, num_stages, deterministic)
    return _apply(q, k, v, float(alpha), d_amp, phase == 'quadratic', cfg, launch)


# torch.compile (train.py uses it on CUDA) leaves the kernel call alone and runs it as is: the
# kernels are already fused, and tracing through the launch code gains nothing but fragility.
@torch.compiler.disable
def _apply(q, k, v, alpha, d_amp, quadratic, cfg, launch):
    return _TapaAttention.apply(q, k, v, alpha, d_amp, quadratic, cfg, launch)
