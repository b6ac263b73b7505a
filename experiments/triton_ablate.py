"""
Where the fused TAPA kernel's time goes, by ablation: time its kernels with one piece of TAPA's
elementwise work replaced by something nearly free, and compare with RoPE + SDPA at the same shape.

    python experiments/triton_ablate.py                  # bfloat16, B=4 H=16 L=8192 D=64, one GPU
    python experiments/triton_ablate.py --head_dim 128 --n_head 8

The variants (the kernels of tapa_triton.py, with one of its helper functions swapped):
  baseline   the kernels as they are
  no_table   every distance weight |m-n|^alpha / sqrt(d_P) is one constant: no load of the table of
             distance weights per score (_distance_weights)
  no_cos     cos and sin of the angle are two multiply-adds: no exact reduction to one turn and no
             special-function instruction (_cos_sin_2pi)
  neither    both
What a variant saves is about the most that making that piece cheaper could gain; what remains in
`neither` is mostly what FlashAttention does too (the matmuls, the softmax, the memory traffic) plus
TAPA's few extra multiplies. The ablated variants compute wrong attention: this is a measurement,
not a model.

Triton compiles a kernel once, with the helper functions its module holds at that moment, so each
variant runs in a process of its own (this script again, with --_variant). Times are medians of
triton.testing.do_bench: the forward alone (no autograd), and the backward alone, both two-kernel
(deterministic=True) and single pass (deterministic=False).
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast_attention  # noqa: E402
import model  # noqa: E402
import tapa_triton as tt  # noqa: E402
from triton_tiles import add_shape_arguments  # noqa: E402  (this folder is on sys.path when run as a script)

VARIANTS = ('baseline', 'no_table', 'no_cos', 'neither')

if tt._TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    @triton.jit
    def constant_weights(row_ptrs, col_offsets, keep, CAUSAL_MASK: tl.constexpr):
        """Stands in for tapa_triton._distance_weights: a tile of the right shape, no memory access."""
        return tl.full((row_ptrs.shape[0], col_offsets.shape[0]), 0.3, tl.float32)

    @triton.jit
    def polynomial_cos_sin(t):
        """Stands in for tapa_triton._cos_sin_2pi: two multiply-adds, bounded values for the angles here."""
        return 1.0 - 0.001 * t, 0.001 * t


def use_variant(variant):
    """Swap tapa_triton's helper functions for the variant's, before any kernel is compiled."""
    if variant in ('no_table', 'neither'):
        tt._distance_weights = constant_weights
    if variant in ('no_cos', 'neither'):
        tt._cos_sin_2pi = polynomial_cos_sin


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument('--variants', default=','.join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument('--_variant', default=None, help=argparse.SUPPRESS)
    return p


def time_variant(args):
    """In the variant's own process: {'fwd': ms, 'bwd': ms, 'bwd_single': ms}; RoPE + SDPA's fwd and bwd
    for 'rope'."""
    dtype = getattr(torch, args.dtype)
    B, H, L, D = args.batch, args.n_head, args.L, args.head_dim
    g = torch.Generator(device='cuda').manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, device='cuda', dtype=dtype, generator=g) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median')

    def fwd_bwd_ms(forward):
        with torch.no_grad():
            fwd = bench(forward)
        out = forward()
        return fwd, bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))

    if args._variant == 'rope':
        cfg = model.GPTConfig(n_head=H, n_embd=H * D, block_size=L)
        cos, sin = (t.to('cuda') for t in model.rope_cos_sin(cfg, D, L, 'cuda'))
        fwd, bwd = fwd_bwd_ms(lambda: fast_attention.sdpa_attention(model.apply_rope(q, cos, sin),
                                                                    model.apply_rope(k, cos, sin), v))
        return {'fwd': fwd, 'bwd': bwd}
    use_variant(args._variant)
    fwd, bwd = fwd_bwd_ms(lambda: tt.tapa_attention_triton(q, k, v, 0.1, 0.5, args.phase, deterministic=True))
    _, bwd_single = fwd_bwd_ms(lambda: tt.tapa_attention_triton(q, k, v, 0.1, 0.5, args.phase,
                                                                deterministic=False))
    return {'fwd': fwd, 'bwd': bwd, 'bwd_single': bwd_single}


def main():
    args = build_parser().parse_args()
    if not tt.is_available():
        sys.exit("needs a CUDA GPU and Triton")
    if args._variant is not None:
        print(json.dumps(time_variant(args)))
        return
    variants = args.variants.split(',')
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {args.dtype}, "
          f"B={args.batch} H={args.n_head} L={args.L} D={args.head_dim}, {args.phase} phase; medians, ms")
    rows = {}
    shape = ['--dtype', args.dtype, '--head_dim', str(args.head_dim), '--n_head', str(args.n_head),
             '--batch', str(args.batch), '--L', str(args.L), '--phase', args.phase]
    for variant in ['rope'] + variants:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *shape, '--_variant', variant],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = rows[variant]
        if variant == 'rope':
            print(f"{'RoPE + SDPA':12s} forward {r['fwd']:8.3f}  backward {r['bwd']:8.3f}", flush=True)
            continue
        ratio = ''
        if 'rope' in rows:
            rope = rows['rope']['fwd'] + rows['rope']['bwd']
            ratio = (f"   fwd+bwd / RoPE+SDPA: {(r['fwd'] + r['bwd']) / rope:.2f}x two kernels, "
                     f"{(r['fwd'] + r['bwd_single']) / rope:.2f}x single pass")
        print(f"{variant:12s} forward {r['fwd']:8.3f}  backward {r['bwd']:8.3f}  single pass {r['bwd_single']:8.3f}"
              f"{ratio}", flush=True)


if __name__ == '__main__':
    main()
