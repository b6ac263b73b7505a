"""
The engine: faster implementations of model.py's reference attention, each computing exactly what
the reference computes, and the rule that picks one.

    model.dot_product_attention  ->  PyTorch's fused scaled_dot_product_attention (SDPA)
    model.tapa_attention         ->  the reference itself while the score matrix is small; beyond,
                                     an exact chunked version (below, plain PyTorch, memory linear in
                                     T in forward and backward) or the fused Triton kernel
                                     (tapa_triton.py) on NVIDIA GPUs
    model.cope_attention         ->  the reference, a block of queries at a time when no gradient is
                                     wanted (each query's positions count its own keys only), so a long
                                     evaluation holds (block x T) scores, not (T x T)

A student's edit is never silently bypassed. Each fast path records a fingerprint of the reference
functions it reproduces (their code, comments and docstrings stripped: FINGERPRINTS). While the
functions in model.py still have that fingerprint, the fast path runs; once any of them differs
(edited in the file, or monkeypatched), the reference runs instead, at every length (without
gradients, query block by query block, so that long evaluations still fit), and a one-line notice
says so. The check costs a few attribute reads per call; the source is read once per function.
tests/test_fast_attention.py fails when a recorded fingerprint is stale: after changing a
reference on purpose, make the fast path match it (the equivalence tests say whether it does), then
record the new fingerprint printed by `python fast_attention.py`.
"""

import ast
import dataclasses
import functools
import hashlib
import inspect
import io
import math
import sys
import textwrap
import tokenize

import torch
from torch.nn import functional as F

import model
from model import autocast_off, causal_mask, tapa_split

# the reference functions of model.py each fast path reproduces, and each one's fingerprint when it was
# last checked against the fast paths (python fast_attention.py prints them as they are now)
REFERENCES = {
    'dot_product_attention': ('dot_product_attention', 'causal_mask'),
    'tapa_attention': ('tapa_attention', 'tapa_scores', 'tapa_distance_weight', 'tapa_split', 'causal_mask',
                       'autocast_off'),
    'cope_attention': ('cope_attention', 'cope_positions', 'causal_mask'),
}
FINGERPRINTS = {
    'dot_product_attention': '0991e816063681d2',
    'causal_mask': '0d4c1c12196d99e1',
    'tapa_attention': '9261bc3302783b30',
    'tapa_scores': '92c990f9aa384380',
    'tapa_distance_weight': 'ff47f5fb6d95fb9a',
    'tapa_split': '8a5a5d4576ae1982',
    'autocast_off': '1aa46449e9534f35',
    'cope_attention': 'e6fa0af8eaa6c8b4',
    'cope_positions': '9e9f511b4883c80c',
}
NAIVE_SCORES = 128 * 128  # TAPA: up to this many scores per head the reference itself is fastest


# -----------------------------------------------------------------------------
# the rule: a fast path only while the reference it reproduces is unchanged


def code_of(function):
    """A function's source without comments, docstrings, blank lines or trailing spaces (so that
    editing a comment keeps the fast paths), or None where there is no source to read."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        lines = source.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                lines[row - 1] = lines[row - 1][:col]
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, 'body', None)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                for row in range(body[0].lineno - 1, body[0].end_lineno):
                    lines[row] = ''
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return None  # e.g. a lambda passed inline, or code typed at a prompt: not the checked code
    return '\n'.join(line.rstrip() for line in lines if line.strip())


def fingerprint(function):
    code = code_of(function)
    return None if code is None else hashlib.sha256(code.encode()).hexdigest()[:16]


_checked = {}  # reference name -> (model.py's functions when last checked, the names of those that changed)


def changed_functions(name):
    """The functions of model.py behind reference `name` whose code differs from the recorded one
    (empty: the fast paths reproduce it). Compares function objects on every call, reads source
    only when one of them was replaced (a monkeypatch) or on the first call."""
    functions = tuple(getattr(model, f) for f in REFERENCES[name])
    seen = _checked.get(name)
    if seen is None or seen[0] != functions:
        seen = _check(name, functions)
    return seen[1]


@torch.compiler.disable  # reads files; runs once per process (and per monkeypatch), never per step
def _check(name, functions):
    changed = tuple(f for f, fn in zip(REFERENCES[name], functions) if fingerprint(fn) != FINGERPRINTS.get(f))
    _checked[name] = (functions, changed)
    if changed:
        names, verb = ', '.join('model.' + f for f in changed), 'differs' if len(changed) == 1 else 'differ'
        print(f"notice: {names} {verb} from the code the fast attention was checked against: running the "
              f"reference model.{name} (slower, memory quadratic in the length)", file=sys.stderr, flush=True)
    return _checked[name]


_asked = None  # describe() collects here the references that the model's attention asks for


def implementation(reference, cfg):
    """model.fast(): the fast path for `reference` where one reproduces it, else the reference."""
    name = next((n for n in REFERENCES if reference is getattr(model, n)), None)
    if _asked is not None:
        _asked.append(name or reference.__name__)
        return reference
    if name is None:  # a function without a fast path (e.g. one of your own): it runs as it is
        return reference
    changed = changed_functions(name)
    if changed:  # in query blocks only while the mask is the causal one the blocks rely on
        return functools.partial(reference_in_blocks, reference, block=None if 'causal_mask' in changed else 128)
    if name == 'dot_product_attention':
        return sdpa_attention
    if name == 'cope_attention':
        return functools.partial(reference_in_blocks, reference)
    return functools.partial(tapa_attention, impl=cfg.attn_impl)


def in_query_blocks(attention, q, k, v, block, *args, **kwargs):
    """attention(q, k, v, ...) a block of `block` queries at a time, concatenated. The queries are the
    last Tq positions, so a block of them is one too, against the keys up to its last query."""
    Tq, Tk = q.size(-2), k.size(-2)
    return torch.cat([attention(q[..., i0:i0 + block, :], k[..., :Tk - Tq + min(i0 + block, Tq), :],
                                v[..., :Tk - Tq + min(i0 + block, Tq), :], *args, **kwargs)
                      for i0 in range(0, Tq, block)], dim=-2)


def reference_in_blocks(reference, q, k, v, *args, block=128):
    """reference(q, k, v, *args), by blocks of `block` queries when no gradient is wanted (so that a
    long evaluation needs (block x Tk) scores at a time, not (Tq x Tk); a bias is a function of the
    block's two lengths: see model.dot_product_attention)."""
    Tq = q.size(-2)
    if block is None or Tq <= block or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return reference(q, k, v, *args)
    return in_query_blocks(reference, q, k, v, block, *args)


def describe(model_, device, dtype=torch.float32):
    """One line saying which implementation this model's attention runs, for every script to print
    at start-up, e.g. 'attention: tapa = reference up to 128x128 scores, chunked beyond (exact;
    reproduces model.tapa_attention, model.tapa_scores, ...)'. Asks the attention itself (a dry run
    on two tokens that computes nothing) which references it uses."""
    global _asked
    cfg, H, D = model_.config, model_.config.n_head, model_.config.n_embd // model_.config.n_head
    where = model_.lm_head.weight.device
    x = torch.zeros(1, H, 2, D, device=where)
    pos = model.Positions(q=torch.arange(2, device=where), k=torch.arange(2, device=where),
                          tables=model_.pe_tables(2, where))
    params = model_.pe_params(0)
    _asked = []
    try:
        with torch.no_grad():
            # with attn_impl='auto': model.fast() returns before asking the engine under 'naive'
            model.PE_TABLE[cfg.pos_encoding].attend(x, x, x, pos, params, dataclasses.replace(cfg, attn_impl='auto'))
        asked = list(dict.fromkeys(_asked))
    finally:
        _asked = None
    rules = [_rule(name, cfg, device, dtype, D) for name in asked]
    return f"attention: {cfg.pos_encoding} = " + ('; '.join(rules) if rules else 'its own attention function')


def _rule(name, cfg, device, dtype, head_dim):
    if name not in REFERENCES:
        return f"model.{name} (reference; no fast path)"
    if cfg.attn_impl == 'naive':
        return f"reference model.{name} (attn_impl='naive')"
    changed = changed_functions(name)
    if changed:
        return (f"reference model.{name} at every length ({', '.join('model.' + f for f in changed)} "
                f"edited since the fast paths were checked; query blocks without gradients)")
    exact = f"exact; reference model.{name}"
    if name == 'dot_product_attention':
        return f"PyTorch SDPA ({exact})"
    if name == 'cope_attention':
        return f"the reference, in query blocks of 128 without gradients ({exact})"
    impl = pick_tapa_impl(cfg.attn_impl, torch.device(device), 4096, 4096, head_dim, dtype)
    if impl == 'triton':
        return f"fused Triton kernel ({exact})"
    if cfg.attn_impl == 'auto':
        side = math.isqrt(NAIVE_SCORES)
        return f"reference up to {side}x{side} scores, chunked beyond ({exact})"
    return f"chunked ({exact})"


# -----------------------------------------------------------------------------
# dot-product attention: PyTorch's fused kernels


def sdpa_attention(q, k, v, bias=None, max_bias=2**24):
    """model.dot_product_attention by torch's scaled_dot_product_attention (FlashAttention or a
    memory-efficient kernel where the device has one): no (Tq, Tk) scores in memory. An additive bias
    (ALiBi, T5, Kerple) must be passed to SDPA whole, so it is made a block of queries at a time, each
    block against the keys up to its last query, at most max_bias numbers (64 MB in float32) each:
    its memory does not grow as T^2 either."""
    Tq, Tk = q.size(-2), k.size(-2)
    if bias is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    block = max(1, max_bias // (q.size(1) * Tk))  # queries per block
    if bias is not None and block < Tq:
        return in_query_blocks(sdpa_attention, q, k, v, block, bias, max_bias=max_bias)
    mask = causal_mask(Tq, Tk, q.device)  # is_causal aligns top-left, wrong for Tq < Tk (a KV cache)
    if bias is not None:
        mask = bias(Tq, Tk).to(q.dtype).masked_fill(~mask, float('-inf'))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# -----------------------------------------------------------------------------
# TAPA: which implementation, and the exact chunked one


def tapa_attention(q, k, v, alpha, theta, phase='quadratic', impl='auto', chunk_size=128):
    """model.tapa_attention (Eq. 12) by impl: 'naive' (the reference itself), 'chunked' (exact,
    memory linear in T), 'triton' (fused CUDA kernel), or 'auto' (pick_tapa_impl). q (B, H, Tq, D),
    k and v (B, H, Tk, D) with Tq <= Tk: the queries are the LAST Tq positions. Causal."""
    Tq, Tk = q.size(-2), k.size(-2)
    if Tq > Tk:
        raise ValueError(f"tapa_attention: {Tq} queries but only {Tk} keys; queries must be the last Tq positions")
    d_amp, _ = tapa_split(q.size(-1), theta)
    if phase not in ('quadratic', 'linear'):
        raise ValueError(f"tapa_attention: phase={phase!r} must be 'quadratic' or 'linear'")
    impl = pick_tapa_impl(impl, q.device, Tq, Tk, q.size(-1), q.dtype)
    if impl == 'naive':
        return model.tapa_attention(q, k, v, alpha, theta, phase)
    if impl == 'chunked':
        return ChunkedTAPA.apply(q, k, v, alpha, d_amp, phase, chunk_size)
    if impl == 'triton':
        from tapa_triton import tapa_attention_triton  # optional, imported only when asked for
        return tapa_attention_triton(q, k, v, alpha, theta, phase)
    raise ValueError(f"unknown TAPA impl {impl!r}: use 'naive', 'chunked' or 'triton'")


def pick_tapa_impl(requested, device, Tq, Tk, head_dim, dtype):
    """'auto' -> the fused kernel on an NVIDIA GPU when Triton is installed and takes this head dim and
    dtype; otherwise the reference while the score matrix is small (up to 128 x 128 per head, or one
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
    return 'naive' if Tq * Tk <= NAIVE_SCORES else 'chunked'


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
    With these, forward + backward takes about 1.5-2x the time of RoPE + SDPA on a CPU (docs/performance.md).
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


if __name__ == '__main__':  # print FINGERPRINTS as model.py's reference functions are now
    names = dict.fromkeys(f for functions in REFERENCES.values() for f in functions)
    print('FINGERPRINTS = {\n' + ''.join(f"    {f!r}: {fingerprint(getattr(model, f))!r},\n" for f in names) + '}')
