"""
Time the fused TAPA kernel's tile sizes on this GPU, one kernel at a time.

tapa_triton._tile_sizes picks (BLOCK_M, BLOCK_N, num_warps) for each of the three kernels (forward,
dK/dV, dQ) from the dtype and head dim. This script times alternatives for each kernel while the other
two keep their defaults, at one realistic shape, so you can see whether your GPU wants other tiles:

    python experiments/triton_tiles.py                               # bfloat16, head dim 64, L=8192
    python experiments/triton_tiles.py --head_dim 128 --n_head 8 --dtype float16

'single' times the single-pass backward (tapa_attention_triton(..., deterministic=False): the dK/dV
kernel also adds dQ with atomics; the default on Hopper in bfloat16) against the two-kernel backward
(deterministic=True) with its default tiles.

The forward is timed alone (no autograd); a kernel of the backward is timed as the whole backward
(dK/dV + dQ + the small Delta pass) with that kernel's tiles changed, so differences between rows of
one kernel are that kernel's. Times are medians of triton.testing.do_bench. For scale it also times
RoPE + SDPA (FlashAttention) at the same shape. Configurations the GPU cannot run (too much shared
memory) are reported, not fatal.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast_attention  # noqa: E402
import model  # noqa: E402
import tapa_triton as tt  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]). BLOCK_M counts query rows, BLOCK_N key
# columns; the forward and dQ keep a block of queries and stream keys, dK/dV keeps a block of keys and
# streams queries. maxnreg caps the registers per thread, so that more warps fit on an SM (65536
# registers: at 255 per thread, 8 warps; at 168, 12; at 128, 16) to hide latency, at the price of
# some spills (ptxas's report: `python tests/test_tapa_triton_compile.py --worker --all`).
CANDIDATES = {
    'fwd':  [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 4, 2),
             (128, 32, 4, 2), (64, 32, 4, 2), (128, 128, 8, 2), (32, 32, 4, 2), (64, 64, 4, 2, 128)],
    'dkdv': [(32, 64, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2),
             (16, 64, 4, 2), (32, 64, 8, 3), (32, 32, 4, 2), (16, 16, 4, 2), (32, 64, 4, 2, 168),
             (16, 64, 4, 2, 168)],
    'dq':   [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2),
             (32, 32, 4, 2), (64, 32, 4, 3), (64, 32, 8, 2), (32, 16, 4, 2), (64, 32, 4, 2, 128)],
    # the single-pass backward: the dK/dV kernel's tiles; more keys per program, fewer dQ atomics
    'single': [(32, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2),
               (16, 64, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2, 168)],
}


def add_shape_arguments(p):
    """The shape and dtype measured (experiments/triton_ablate.py takes the same)."""
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    p.add_argument('--head_dim', type=int, default=64)
    p.add_argument('--n_head', type=int, default=16)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--L', type=int, default=8192)
    p.add_argument('--phase', default='quadratic', choices=['quadratic', 'linear'])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[1])
    add_shape_arguments(p)
    p.add_argument('--theta', type=float, default=0.5)
    p.add_argument('--alpha', type=float, default=0.1)
    p.add_argument('--kernels', default='fwd,dkdv,dq,single')
    return p


def main():
    args = build_parser().parse_args()
    if not tt.is_available():
        sys.exit("needs a CUDA GPU and Triton")
    import triton

    dtype = getattr(torch, args.dtype)
    B, H, L, D = args.batch, args.n_head, args.L, args.head_dim
    q, k, v, do = (torch.randn(B, H, L, D, device='cuda', dtype=dtype) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    d_amp, _ = tt.tapa_split(D, args.theta)
    quadratic = args.phase == 'quadratic'
    cfg, default = tt._launch_config(q, d_amp, None, None, None, None, deterministic=True)
    cfg_single, default_single = tt._launch_config(q, d_amp, None, None, None, None, deterministic=False)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{args.dtype}, B={B} H={H} L={L} D={D}, {args.phase} phase")
    print("defaults: " + ', '.join(f"{n} {tuple(c.values())}" for n, c in default.items())
          + f"; single pass: dkdv {tuple(default_single['dkdv'].values())}")

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median')

    def backward_ms(forward):  # the backward alone: one forward, then its gradient timed repeatedly
        out = forward()
        return bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))

    # the bar: RoPE + FlashAttention (SDPA) at the same shape
    cos, sin = (t.to('cuda') for t in model.rope_cos_sin(model.GPTConfig(n_head=H, n_embd=H * D, block_size=L), D, L, 'cuda'))

    def rope_fwd():
        return fast_attention.sdpa_attention(model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin), v)
    with torch.no_grad():
        rope_fwd_ms = bench(rope_fwd)
    rope_bwd_ms = backward_ms(rope_fwd)
    print(f"RoPE + SDPA: forward {rope_fwd_ms:.3f} ms, backward {rope_bwd_ms:.3f} ms")

    # FLOPs counted as for FlashAttention: causal forward 4 * B * H * L^2 * D / 2 (QK^T and PV), the
    # backward 2.5x that (its recomputation not counted)
    fwd_flops = 2 * B * H * L * L * D
    print(f"{'kernel':6s} {'BLOCK_M':>7s} {'BLOCK_N':>7s} {'warps':>5s} {'stages':>6s} {'maxnreg':>7s} {'ms':>9s} "
          f"{'vs default':>10s} {'TFLOP/s':>8s}")
    # 'single': the single-pass backward (deterministic=False), the dK/dV kernel adding dQ with
    # atomics; its rows are compared with the two-kernel backward (deterministic=True)
    for name in args.kernels.split(','):
        base_ms = None
        if name == 'single':
            base_ms = backward_ms(lambda: tt._apply(q, k, v, args.alpha, d_amp, quadratic, cfg, default))
            print(f"single: the single-pass backward; 'vs default' is against the two-kernel backward "
                  f"(deterministic=True) with its default tiles, {base_ms:.3f} ms")
        tiles_of = 'dkdv' if name == 'single' else name  # the single pass runs in the dK/dV kernel
        defaults = default_single if name == 'single' else default
        d = defaults[tiles_of]  # (under TRITON_INTERPRET=1 it has no num_warps / num_stages)
        first = (d['BLOCK_M'], d['BLOCK_N'], d.get('num_warps', 4), d.get('num_stages', 2))
        for bm, bn, nw, ns, *maxnreg in [first] + [c for c in CANDIDATES[name] if c != first]:
            launch = {n: dict(c) for n, c in defaults.items()}
            launch[tiles_of] = dict(d, BLOCK_M=bm, BLOCK_N=bn,  # the other options as the default's
                                    **(dict(num_warps=nw, num_stages=ns) if 'num_warps' in d else {}),
                                    **(dict(maxnreg=maxnreg[0]) if maxnreg else {}))
            regs = str(maxnreg[0]) if maxnreg else '-'
            try:
                if name == 'fwd':
                    with torch.no_grad():
                        ms = bench(lambda: tt._apply(q, k, v, args.alpha, d_amp, quadratic, cfg, launch))
                    flops = fwd_flops
                else:
                    kernel_cfg = cfg_single if name == 'single' else cfg
                    ms = backward_ms(lambda: tt._apply(q, k, v, args.alpha, d_amp, quadratic, kernel_cfg, launch))
                    flops = 2.5 * fwd_flops
            except Exception as e:  # noqa: BLE001 - e.g. triton's OutOfResources (shared memory)
                print(f"{name:6s} {bm:7d} {bn:7d} {nw:5d} {ns:6d} {regs:>7s}   failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]}")
                continue
            base_ms = base_ms or ms  # the first row of each kernel is its default
            print(f"{name:6s} {bm:7d} {bn:7d} {nw:5d} {ns:6d} {regs:>7s} {ms:9.3f} {ms / base_ms:10.2f} "
                  f"{flops / ms / 1e9:8.1f}", flush=True)


if __name__ == '__main__':
    main()
