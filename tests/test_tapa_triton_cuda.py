"""The fused Triton kernel on a real CUDA GPU (skipped on machines without one, such as CI).

test_tapa_triton.py checks the kernels' arithmetic in Triton's CPU interpreter at toy sizes, and
test_tapa_triton_compile.py that they compile for real GPUs. Here the compiled kernels run on the
GPU, at sizes that span many tiles (with partial tiles at the ends), in the three input dtypes, and
are compared with model.py's materialized TAPA (impl='naive') computed in float64 from the same
inputs. The error measure is ||got - ref|| / ||ref|| over the whole tensor, for the output and the
gradients of q, k and v.

What passes: the kernel must be at least as accurate as the readable PyTorch path in the same dtype
(within a factor of 2: FlashAttention's own test criterion), or below an absolute bound per dtype
that is what that dtype's rounding allows (float32 with float32-accurate matmuls: 5e-5; float16
operands with float32 accumulation: 3e-3; bfloat16: 1e-2). A wrong mask, tile bound or gradient
term is off by far more (order 1).

Every output is checked to be finite after the caching allocator was filled with NaN, so an element
the kernel forgot to write shows up.

    python -m pytest tests/test_tapa_triton_cuda.py -n 8   # in parallel (pytest-xdist), compiles faster
    python tests/test_tapa_triton_cuda.py                  # the table of errors, kernel vs PyTorch
"""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HAS_TRITON = importlib.util.find_spec('triton') is not None
pytestmark = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                reason="needs a CUDA GPU and Triton (the fused kernel runs on CUDA only)")

# shapes and TAPA settings; Tq < Tk means the queries are the last Tq positions (a KV cache)
CASES = {
    'quadratic_D64':        dict(B=2, H=3, Tq=1000, Tk=1000, D=64, theta=0.5, phase='quadratic', alpha=0.1),
    'linear_D64':           dict(B=2, H=3, Tq=1000, Tk=1000, D=64, theta=0.5, phase='linear', alpha=0.1),
    'quadratic_D128':       dict(B=1, H=2, Tq=777, Tk=777, D=128, theta=0.5, phase='quadratic', alpha=0.1),
    'linear_D128':          dict(B=1, H=2, Tq=777, Tk=777, D=128, theta=0.5, phase='linear', alpha=0.1),
    'quadratic_D32_theta.25_Tq<Tk': dict(B=2, H=2, Tq=300, Tk=1000, D=32, theta=0.25, phase='quadratic', alpha=0.1),
    'linear_D96_theta.25':  dict(B=1, H=2, Tq=513, Tk=513, D=96, theta=0.25, phase='linear', alpha=0.1),
    'quadratic_D64_decode': dict(B=3, H=2, Tq=1, Tk=2048, D=64, theta=0.5, phase='quadratic', alpha=0.1),
    'quadratic_D64_strided': dict(B=2, H=2, Tq=600, Tk=600, D=64, theta=0.5, phase='quadratic', alpha=0.1,
                                  layout='bthd'),
    'quadratic_D64_alpha.5': dict(B=1, H=2, Tq=2048, Tk=2048, D=64, theta=0.5, phase='quadratic', alpha=0.5),
    'quadratic_D64_8k':     dict(B=1, H=2, Tq=8192, Tk=8192, D=64, theta=0.5, phase='quadratic', alpha=0.1),
    # query lengths that are whole dK/dV blocks: its main loop loads without row tests (TQ_TAIL=False)
    'linear_D64_Tq<Tk_whole_blocks': dict(B=2, H=2, Tq=512, Tk=1000, D=64, theta=0.5, phase='linear', alpha=0.1),
    # the single-pass backward (deterministic=False: dQ added with atomics by the dK/dV kernel)
    'quadratic_D64_single_pass': dict(B=2, H=3, Tq=1000, Tk=1000, D=64, theta=0.5, phase='quadratic',
                                      alpha=0.1, deterministic=False),
    'linear_D128_single_pass': dict(B=1, H=2, Tq=777, Tk=777, D=128, theta=0.5, phase='linear', alpha=0.1,
                                    deterministic=False),
    'quadratic_D32_theta.25_Tq<Tk_single_pass': dict(B=2, H=2, Tq=300, Tk=1000, D=32, theta=0.25,
                                                     phase='quadratic', alpha=0.1, deterministic=False),
    'quadratic_D64_single_pass_whole_blocks': dict(B=2, H=3, Tq=1024, Tk=1024, D=64, theta=0.5,
                                                   phase='quadratic', alpha=0.1, deterministic=False),
}
DTYPES = ['bfloat16', 'float16', 'float32']
BOUND = {'float32': 5e-5, 'float16': 3e-3, 'bfloat16': 1e-2}

if HAS_TRITON and torch.cuda.is_available():
    import triton
    import triton.language as tl
    import tapa_triton

    @triton.jit  # at module level: a kernel finds the names it uses among its module's globals
    def cos_sin_kernel(T, C, S, N: tl.constexpr):
        offs = tl.arange(0, N)
        c, s = tapa_triton._cos_sin_2pi(tl.load(T + offs))
        tl.store(C + offs, c)
        tl.store(S + offs, s)


def poison_allocator():
    """Fill free memory of PyTorch's caching allocator with NaN: outputs the kernels then allocate
    with torch.empty start as NaN, so any element left unwritten is caught by the finiteness check."""
    free, _ = torch.cuda.mem_get_info()
    block = torch.empty(min(free // 4, 2**30) // 4, device='cuda', dtype=torch.float32)
    block.fill_(float('nan'))
    del block  # back to the cache, not to the driver


def compare(B, H, Tq, Tk, D, theta, phase, alpha, dtype, layout='bhtd', deterministic=True, seed=0):
    """Relative errors of the kernel and of the naive PyTorch path in `dtype`, against float64."""
    from fast_attention import tapa_attention
    from tapa_triton import tapa_attention_triton
    from test_tapa_triton import forward_backward
    dt = getattr(torch, dtype)
    g = torch.Generator(device='cuda').manual_seed(seed)

    def make(T):  # fresh random values; for 'bthd' a (B, H, T, D) view of a (B, T, H, D) tensor, as model.py makes
        if layout == 'bthd':
            return torch.randn(B, T, H, D, device='cuda', generator=g, dtype=torch.float64).to(dt).transpose(1, 2)
        return torch.randn(B, H, T, D, device='cuda', generator=g, dtype=torch.float64).to(dt)
    q, k, v, do = make(Tq), make(Tk), make(Tk), make(Tq)

    poison_allocator()
    got = forward_backward(lambda a, b, c: tapa_attention_triton(a, b, c, alpha, theta, phase,
                                                                 deterministic=deterministic), (q, k, v), do)
    same_dtype = forward_backward(lambda a, b, c: tapa_attention(a, b, c, alpha, theta, phase, impl='naive'),
                                  (q, k, v), do)
    ref = forward_backward(lambda a, b, c: tapa_attention(a, b, c, alpha, theta, phase, impl='naive'),
                           (q.double(), k.double(), v.double()), do)
    errors = {}
    for name, a, p, r in zip(('out', 'dq', 'dk', 'dv'), got, same_dtype, ref):
        errors[name] = float((a - r).norm() / r.norm())
        errors[name + '_pytorch'] = float((p - r).norm() / r.norm())
        errors[name + '_finite'] = bool(torch.isfinite(a).all())
    del got, same_dtype, ref
    torch.cuda.empty_cache()
    return errors


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', list(CASES))
def test_kernel_matches_float64(name, dtype):
    errors = compare(**CASES[name], dtype=dtype)
    for key in ('out', 'dq', 'dk', 'dv'):
        err, pytorch_err = errors[key], errors[key + '_pytorch']
        assert errors[key + '_finite'], f"{name} {dtype}: {key} has inf/nan (an unwritten or overflowing element)"
        assert err <= max(2 * pytorch_err, BOUND[dtype]), (
            f"{name} {dtype}: {key} relative error {err:.2e}, PyTorch in the same dtype {pytorch_err:.2e}, "
            f"bound {BOUND[dtype]:.0e}")


@pytest.mark.parametrize('Tq,Tk', [(1000, 1000), (300, 1000), (1, 2048), (1024, 1024), (512, 1000)])
@pytest.mark.parametrize('deterministic', [True, False])
def test_reads_only_its_table_entries(monkeypatch, Tq, Tk, deterministic):
    """The table of distance weights surrounded by NaN (as in test_tapa_triton.py, here at the GPU's
    own tile sizes): a read outside the entries the kernels are meant to read shows as NaN."""
    from test_tapa_triton import surrounded_by_nan
    monkeypatch.setattr(tapa_triton, '_distance_table', surrounded_by_nan(tapa_triton._distance_table))
    g = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 64, device='cuda', generator=g).bfloat16().requires_grad_()
               for T in (Tq, Tk, Tk))
    out = tapa_triton.tapa_attention_triton(q, k, v, 0.1, 0.5, deterministic=deterministic)
    out.backward(torch.randn_like(out))
    for name, t in (('out', out), ('dq', q.grad), ('dk', k.grad), ('dv', v.grad)):
        assert torch.isfinite(t).all(), f"{name} has NaN: a read outside the table's valid entries"


def test_default_follows_deterministic_mode():
    """With torch.use_deterministic_algorithms(True) the default backward is the two-kernel one (on
    Hopper in bfloat16 it is otherwise the single pass, whose atomic additions come in a varying
    order): the same bits as deterministic=True, twice."""
    g = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2048, 64, device='cuda', generator=g).bfloat16().requires_grad_() for _ in range(3))
    do = torch.randn(2, 4, 2048, 64, device='cuda', generator=g).bfloat16()

    def grads(**kwargs):
        return torch.autograd.grad(tapa_triton.tapa_attention_triton(q, k, v, 0.1, 0.5, **kwargs), (q, k, v), do)
    from test_tapa_triton import deterministic_mode
    two_kernels = grads(deterministic=True)
    with deterministic_mode():
        runs = [grads() for _ in range(2)]
    for run in runs:
        for name, a, b in zip(('dq', 'dk', 'dv'), run, two_kernels):
            assert torch.equal(a, b), f"{name}: in deterministic mode the default is not the two-kernel backward"


def test_cos_sin_of_turns_on_the_gpu():
    """The kernels' cos/sin of 2*pi*t (an exact reduction to one turn, then the GPU's special-function
    unit) against float64, from a fraction of a turn to 10^4 turns: within 1e-6, where a plain float32
    cos(2*pi*t) is off by ~4e-3 at 10^4 turns."""
    import math
    for scale in (1.0, 1e4):
        g = torch.Generator(device='cuda').manual_seed(0)
        t = ((torch.rand(4096, device='cuda', dtype=torch.float64, generator=g) * 2 - 1) * scale).float()
        c, s = torch.empty_like(t), torch.empty_like(t)
        cos_sin_kernel[(1,)](t, c, s, N=t.numel())
        angle = 2 * math.pi * t.double()
        assert (c.double() - torch.cos(angle)).abs().max() < 1e-6, scale
        assert (s.double() - torch.sin(angle)).abs().max() < 1e-6, scale


@pytest.mark.parametrize('phase', ['quadratic', 'linear'])
def test_model_uses_the_kernel_and_agrees(phase):
    """A small GPT with attn_impl='triton' (and the phase scaling of the small-model setting, which
    rescales q and k before the kernel) gives the loss and gradients of attn_impl='naive'."""
    import model
    torch.manual_seed(0)
    cfg = model.GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=512, vocab_size=256, bias=False,
                          pos_encoding='tapa', tapa_phase=phase, tapa_phase_scale=0.05, attn_impl='triton')
    gpt = model.GPT(cfg).cuda()
    gpt.set_tapa_phase_ramp(1.0)  # phi scaled by 0.05: q (and k) reach the kernel rescaled
    x = torch.randint(0, 256, (2, 512), device='cuda')
    losses, grads = {}, {}
    for impl in ('triton', 'naive'):
        for block in gpt.transformer.h:
            block.attn.config.attn_impl = impl
        gpt.zero_grad()
        _, loss = gpt(x, x)
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = torch.cat([p.grad.flatten() for p in gpt.parameters()])
    assert abs(losses['triton'] - losses['naive']) < 1e-4 * losses['naive'], losses
    rel = ((grads['triton'] - grads['naive']).norm() / grads['naive'].norm()).item()
    assert rel < 1e-3, f"gradient relative difference {rel:.2e}"


@pytest.mark.parametrize('phase', ['quadratic', 'linear'])
def test_model_under_autocast_uses_the_kernel(phase):
    """As train.py runs it on a GPU: bfloat16 autocast, attn_impl='auto' (the kernel), the small-model
    phase scaling on (q, and k for 'linear', rescaled in float32 before the kernel must get them back
    in bfloat16, k and v's dtype). Loss and gradients as the float32 model's, up to bfloat16."""
    import model
    torch.manual_seed(0)
    cfg = model.GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=512, vocab_size=256, bias=False,
                          pos_encoding='tapa', tapa_phase=phase, tapa_phase_scale=0.05)
    gpt = model.GPT(cfg).cuda()
    gpt.set_tapa_phase_ramp(1.0)
    x = torch.randint(0, 256, (2, 512), device='cuda')
    import fast_attention
    assert fast_attention.pick_tapa_impl('auto', x.device, 512, 512, 64, torch.bfloat16) == 'triton'
    _, loss32 = gpt(x, x)
    grads32 = torch.autograd.grad(loss32, list(gpt.parameters()))
    with torch.autocast('cuda', dtype=torch.bfloat16):
        _, loss16 = gpt(x, x)
    grads16 = torch.autograd.grad(loss16, list(gpt.parameters()))
    assert abs(loss16.item() - loss32.item()) < 1e-2 * loss32.item(), (loss16.item(), loss32.item())
    g32, g16 = (torch.cat([g.flatten().float() for g in gs]) for gs in (grads32, grads16))
    rel = ((g16 - g32).norm() / g32.norm()).item()
    assert rel < 3e-2, f"gradient relative difference {rel:.2e}"


if __name__ == '__main__':
    if not (HAS_TRITON and torch.cuda.is_available()):
        sys.exit("needs a CUDA GPU and Triton")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    print("relative errors vs float64 (||got - ref|| / ||ref||): kernel / PyTorch naive in the same dtype")
    print(f"{'case':32s} {'dtype':9s} " + ' '.join(f"{k:>19s}" for k in ('out', 'dq', 'dk', 'dv')))
    for name, case in CASES.items():
        for dtype in DTYPES:
            e = compare(**case, dtype=dtype)
            cells = ' '.join(f"{e[k]:9.2e}/{e[k + '_pytorch']:9.2e}" + ('' if e[k + '_finite'] else '!')
                             for k in ('out', 'dq', 'dk', 'dv'))
            print(f"{name:32s} {dtype:9s} {cells}", flush=True)
