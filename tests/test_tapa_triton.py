"""Checks of tapa_triton.py, the fused Triton kernel, against model.py's materialized TAPA attention
(impl='naive', itself checked against a per-pair loop in test_model.py): outputs and the gradients of
q, k and v, computed by the reference in float64.

No GPU is needed: Triton's interpreter runs the kernels on CPU tensors (slowly, hence the small sizes;
block sizes of 16 and 32 make even these short sequences span several tiles, with partial tiles at
the ends). The interpreter is switched on by the environment variable TRITON_INTERPRET=1, and it is
read when the kernels are defined, i.e. when tapa_triton is first imported. Inside a pytest run some
other test may already have imported it (or triton) without the variable, so the comparisons run in a
fresh Python process that sets it first: this file is also that process's script
(`python tests/test_tapa_triton.py --worker` prints the errors of every case as JSON).

The checks of bad input run in the pytest process itself: they fail before any kernel is launched.
"""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec('triton') is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install triton): the fused kernel and the CPU "
                           "interpreter these tests run it with both come from it")

# Each case: shapes, TAPA settings, dtype, block sizes for the kernel (None = the GPU defaults),
# and layout 'bhtd' (contiguous) or 'bthd' (q, k, v, dO as transposed views, as model.py makes them).
CASES = {
    'quadratic_D32':         dict(B=1, H=2, Tq=37, Tk=37, D=32, theta=0.5, phase='quadratic', alpha=0.5),
    'linear_D32':            dict(B=1, H=1, Tq=37, Tk=37, D=32, theta=0.5, phase='linear', alpha=0.5),
    'quadratic_D48_Tq<Tk':   dict(B=1, H=2, Tq=19, Tk=45, D=48, theta=0.5, phase='quadratic', alpha=0.5,
                                  block_m=16, block_n=32),
    'linear_D48_Tq<Tk':      dict(B=1, H=2, Tq=19, Tk=45, D=48, theta=0.5, phase='linear', alpha=0.5,
                                  block_m=32, block_n=16),
    'quadratic_D32_theta.25': dict(B=1, H=2, Tq=33, Tk=33, D=32, theta=0.25, phase='quadratic', alpha=1.0),
    'linear_D96_theta.25':   dict(B=1, H=1, Tq=29, Tk=35, D=96, theta=0.25, phase='linear', alpha=0.3),
    'quadratic_D96_decode':  dict(B=2, H=1, Tq=1, Tk=40, D=96, theta=0.5, phase='quadratic', alpha=0.5),
    'quadratic_D64_default_tiles': dict(B=1, H=1, Tq=100, Tk=100, D=64, theta=0.5, phase='quadratic',
                                        alpha=0.1, block_m=None, block_n=None),
    'quadratic_D256_default_tiles': dict(B=1, H=1, Tq=40, Tk=40, D=256, theta=0.5, phase='quadratic',
                                         alpha=0.5, block_m=None, block_n=None),  # float32: 16 x 16 tiles
    'quadratic_D32_strided': dict(B=2, H=2, Tq=13, Tk=22, D=32, theta=0.5, phase='quadratic', alpha=0.5,
                                  layout='bthd'),
    'quadratic_D32_fp16':    dict(B=1, H=1, Tq=37, Tk=37, D=32, theta=0.5, phase='quadratic', alpha=0.5,
                                  dtype='float16'),
    'linear_D32_fp16_default_tiles': dict(B=1, H=1, Tq=50, Tk=90, D=32, theta=0.5, phase='linear',
                                          alpha=0.5, dtype='float16', block_m=None, block_n=None),
    # the single-pass backward (dQ added with atomics from the dK/dV kernel)
    'quadratic_D48_Tq<Tk_single_pass': dict(B=1, H=2, Tq=19, Tk=45, D=48, theta=0.5, phase='quadratic',
                                            alpha=0.5, block_m=16, block_n=32, deterministic=False),
    'linear_D32_single_pass_strided': dict(B=2, H=2, Tq=37, Tk=37, D=32, theta=0.5, phase='linear',
                                           alpha=0.5, layout='bthd', deterministic=False),
    'quadratic_D32_fp16_single_pass': dict(B=1, H=1, Tq=37, Tk=37, D=32, theta=0.5, phase='quadratic',
                                           alpha=0.5, dtype='float16', deterministic=False),
    # query lengths that are multiples of the dK/dV kernel's BLOCK_M (as in training): its main loop
    # then loads without the row tests (TQ_TAIL=False); B * H > 1, so a read past a row's end would
    # take the next head's values
    'quadratic_D32_whole_blocks': dict(B=2, H=2, Tq=48, Tk=48, D=32, theta=0.5, phase='quadratic', alpha=0.5),
    'linear_D48_Tq<Tk_whole_blocks': dict(B=1, H=2, Tq=32, Tk=45, D=48, theta=0.5, phase='linear', alpha=0.5,
                                          block_m=16, block_n=32),
    'quadratic_D64_fp16_default_tiles_whole_blocks': dict(B=1, H=2, Tq=128, Tk=128, D=64, theta=0.5,
                                                          phase='quadratic', alpha=0.1, dtype='float16',
                                                          block_m=None, block_n=None),
    'quadratic_single_pass_whole_blocks_strided': dict(B=2, H=2, Tq=32, Tk=32, D=32, theta=0.5,
                                                       phase='quadratic', alpha=0.5, layout='bthd',
                                                       deterministic=False),
    # the single pass with the wide tiles it takes on Hopper in bfloat16 (64 x 128 at head dim 64,
    # 32 x 128 at 128; here float32, whose matmuls the interpreter gets right): a partial last block
    # of queries, and whole ones
    'quadratic_D64_single_pass_64x128': dict(B=1, H=2, Tq=150, Tk=200, D=64, theta=0.5, phase='quadratic',
                                             alpha=0.1, block_m=64, block_n=128, deterministic=False),
    'linear_D64_single_pass_64x128_whole_blocks': dict(B=1, H=2, Tq=256, Tk=256, D=64, theta=0.5,
                                                       phase='linear', alpha=0.1, block_m=64, block_n=128,
                                                       deterministic=False),
    'quadratic_D128_single_pass_32x128': dict(B=1, H=2, Tq=160, Tk=160, D=128, theta=0.5, phase='quadratic',
                                              alpha=0.1, block_m=32, block_n=128, deterministic=False),
    # the table of distance weights surrounded by NaN: a read of any entry outside the range the
    # kernels are meant to read (distances 0 .. Tk - 1, and up to a block further for the padding rows
    # of a partial last block, which still enter dK and dV with dO = 0) shows as NaN in the result
    'quadratic_Tq<Tk_poisoned_table': dict(B=1, H=1, Tq=21, Tk=53, D=32, theta=0.5, phase='quadratic',
                                          alpha=0.5, block_m=16, block_n=32, poisoned_table=True),
    'linear_decode_poisoned_table': dict(B=1, H=2, Tq=1, Tk=45, D=32, theta=0.5, phase='linear', alpha=0.5,
                                         block_m=32, block_n=16, poisoned_table=True),
    'quadratic_single_pass_poisoned_table': dict(B=1, H=1, Tq=50, Tk=50, D=32, theta=0.5, phase='quadratic',
                                                 alpha=0.5, deterministic=False, poisoned_table=True),
    'quadratic_single_pass_64x128_poisoned_table': dict(B=1, H=1, Tq=100, Tk=150, D=64, theta=0.5,
                                                        phase='quadratic', alpha=0.5, block_m=64, block_n=128,
                                                        deterministic=False, poisoned_table=True),
    'quadratic_whole_blocks_poisoned_table': dict(B=1, H=1, Tq=32, Tk=53, D=32, theta=0.5, phase='quadratic',
                                                  alpha=0.5, block_m=16, block_n=32, poisoned_table=True),
}
# Largest error allowed, relative to the largest magnitude of the float64 reference. float32 matches
# it to ~3e-5 (as does model.py's own float32 path), float16 inputs to ~5e-4 (probabilities and
# gradients pass through float16 matmuls); a wrong mask, tile bound or gradient term is off by far more.
# (bfloat16 is not checked here: the interpreter's bfloat16 tl.dot returns garbage in triton 3.9.)
TOL = {'float32': 1e-4, 'float16': 5e-3}


def forward_backward(fn, tensors, grad_out):
    """fn(*tensors) and the gradients of <output, grad_out> w.r.t. each tensor, all as float64
    (tests/test_tapa_triton_cuda.py uses it too)."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


@contextlib.contextmanager
def deterministic_mode(warn_only=False):
    """torch.use_deterministic_algorithms(True) inside the block, the previous mode back after it
    (tests/test_tapa_triton_cuda.py uses it too)."""
    import torch
    was, was_warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)


def surrounded_by_nan(distance_table):
    """A stand-in for tapa_triton._distance_table: the same entries, as a view into a buffer of NaN,
    so that a kernel reading outside them gets NaN (tests/test_tapa_triton_cuda.py uses it too)."""
    def table(length, alpha, d_phase, device):
        import torch
        padded = torch.full((length + 2048,), float('nan'), device=device)
        padded[1024:1024 + length] = distance_table(length, alpha, d_phase, device)[:length]
        return padded[1024:]
    return table


def run_case(B, H, Tq, Tk, D, theta, phase, alpha, dtype='float32', block_m=16, block_n=16, layout='bhtd',
             deterministic=True, poisoned_table=False):
    """Worker side: the kernel's output and gradients against the float64 reference, as relative errors."""
    import torch
    import tapa_triton
    from fast_attention import tapa_attention
    from tapa_triton import tapa_attention_triton
    if poisoned_table:
        real_table = tapa_triton._distance_table
        tapa_triton._distance_table = surrounded_by_nan(real_table)
        try:
            return run_case(B, H, Tq, Tk, D, theta, phase, alpha, dtype, block_m, block_n, layout, deterministic)
        finally:
            tapa_triton._distance_table = real_table
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1234)

    def make(T):  # (B, H, T, D) values, as a view of a (B, T, H, D) tensor for the strided layout
        if layout == 'bthd':
            return torch.randn(B, T, H, D, generator=g).to(dt).transpose(1, 2)
        return torch.randn(B, H, T, D, generator=g).to(dt)
    q, k, v, do = make(Tq), make(Tk), make(Tk), make(Tq)

    got = forward_backward(lambda a, b, c: tapa_attention_triton(a, b, c, alpha, theta, phase,
                                                                 deterministic=deterministic,
                                                                 block_m=block_m, block_n=block_n), (q, k, v), do)
    ref = forward_backward(lambda a, b, c: tapa_attention(a, b, c, alpha, theta, phase, impl='naive'),
                           (q.double(), k.double(), v.double()), do)
    errors = {}
    for name, a, r in zip(('out', 'dq', 'dk', 'dv'), got, ref):
        errors[name] = float((a - r).abs().max() / r.abs().max().clamp(min=1e-12))
        errors[name + '_finite'] = bool(torch.isfinite(a).all())
    return errors


def trig_errors():
    """Worker side: the kernels' cos/sin of 2*pi*t (an exact reduction to one turn, then cos and sin)
    against float64, for phases from a fraction of a turn to ten thousand turns."""
    import math
    import torch
    errors = {}
    for scale in (1.0, 1e4):
        t = ((torch.rand(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1) * scale).float()
        c, s = torch.empty_like(t), torch.empty_like(t)
        cos_sin_kernel[(1,)](t, c, s, N=t.numel())
        angle = 2 * math.pi * t.double()
        errors[f'cos_{scale:g}'] = float((c.double() - torch.cos(angle)).abs().max())
        errors[f'sin_{scale:g}'] = float((s.double() - torch.sin(angle)).abs().max())
    return errors


def inference_mode_then_training():
    """Worker side: the first call under torch.inference_mode() builds (and caches) the table of
    distance weights; a later training call saves it for its backward. None if that works, else the
    error."""
    import torch
    from tapa_triton import tapa_attention_triton
    q, k, v = (torch.randn(1, 1, 20, 32) for _ in range(3))
    try:
        with torch.inference_mode():
            tapa_attention_triton(q, k, v, 0.37, 0.5)  # an alpha no other case uses: a fresh table
        q.requires_grad_()
        tapa_attention_triton(q, k, v, 0.37, 0.5).sum().backward()
    except RuntimeError as e:
        return repr(e)
    return None


def second_derivative_error():
    """Worker side: what backward(create_graph=True) through the kernel says (its backward kernels
    are not differentiable: a clear error, not a silently missing second-order term)."""
    import torch
    from tapa_triton import tapa_attention_triton
    q, k, v = (torch.randn(1, 1, 20, 32, requires_grad=True) for _ in range(3))
    try:
        torch.autograd.grad(tapa_attention_triton(q, k, v, 0.1, 0.5).sum(), q, create_graph=True)
    except RuntimeError as e:
        return str(e)
    return None


def interpreter_problem():
    """Worker side: None if this Triton's interpreter can run a loop whose bound is computed from
    tl.program_id, as every kernel here does; else why not. (Triton 3.6's interpreter turns such a
    bound into a Python int with int() of a 1-element array, which NumPy >= 2.4 refuses; Triton 3.9
    works. On a GPU the compiled kernels are unaffected: tests/test_tapa_triton_cuda.py checks those.)"""
    import torch
    import triton
    x = torch.zeros(4)
    try:
        loop_kernel[(2,)](x, 3)
    except Exception as e:  # noqa: BLE001 - whatever the interpreter raises
        import numpy
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run a loop with a runtime bound under "
                f"NumPy {numpy.__version__} ({e!r}); to run these checks, upgrade Triton (3.9 works) or, with the "
                f"Triton of an older torch (3.0 for torch 2.4), use NumPy < 2")
    if x.tolist() != [3.0, 4.0, 0.0, 0.0]:
        return (f"Triton {triton.__version__}'s interpreter computed a loop wrongly under NumPy "
                f"{__import__('numpy').__version__}: {x.tolist()} (Triton 3.9 works; Triton 3.0 with NumPy < 2)")
    return None


def worker():
    import time
    import torch
    torch.set_num_threads(1)
    problem = interpreter_problem()
    if problem:
        print(json.dumps({'interpreter_problem': problem}))
        return
    results = {'trig': trig_errors(), 'inference_mode_then_training': inference_mode_then_training(),
               'second_derivative_error': second_derivative_error()}
    for name, case in CASES.items():
        t0 = time.time()
        results[name] = run_case(**case)
        results[name]['seconds'] = round(time.time() - t0, 2)
    print(json.dumps(results))


@pytest.fixture(scope='module')
def interpreted():
    """Run every case once, in a subprocess with the Triton interpreter on."""
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"the interpreter run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if 'interpreter_problem' in results:
        pytest.skip(results['interpreter_problem'])
    return results


@needs_triton
@pytest.mark.parametrize('name', list(CASES))
def test_matches_reference(interpreted, name):
    errors = interpreted[name]
    tol = TOL[CASES[name].get('dtype', 'float32')]
    for key in ('out', 'dq', 'dk', 'dv'):
        assert errors[key + '_finite'], f"{name}: {key} has inf/nan"
        assert errors[key] < tol, f"{name}: {key} relative error {errors[key]:.2e} > {tol:.0e} ({errors})"


@needs_triton
def test_cos_sin_of_turns(interpreted):
    """cos/sin inside the kernels: the reduction to one turn is exact, so the error stays ~2e-7 however
    many turns the phase makes. (A plain float32 cos(2*pi*t) is off by ~4e-3 at 10^4 turns.) Here the
    interpreter's cos evaluates the reduced angle; on a GPU it is the special-function unit's, checked
    by tests/test_tapa_triton_cuda.py."""
    for key, err in interpreted['trig'].items():
        assert err < 1e-6, f"{key}: error {err:.2e}"


@needs_triton
def test_inference_mode_then_training(interpreted):
    assert interpreted['inference_mode_then_training'] is None, interpreted['inference_mode_then_training']


@needs_triton
def test_second_derivative_is_refused(interpreted):
    assert 'no second derivative' in (interpreted['second_derivative_error'] or ''), interpreted['second_derivative_error']


# ---------------------------------------------------------------------------
# Bad input: one clear error each, before any kernel runs


@pytest.fixture
def tt(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton)")
    sys.path.insert(0, ROOT)
    import tapa_triton
    monkeypatch.setattr(tapa_triton, '_INTERPRETED', False)  # as on a GPU machine: CPU tensors are refused
    return tapa_triton


def qkv(B=1, H=2, Tq=8, Tk=8, D=32, dtype=None, device='cpu'):
    import torch
    dtype = dtype or torch.float32
    return (torch.randn(B, H, Tq, D, dtype=dtype, device=device),
            torch.randn(B, H, Tk, D, dtype=dtype, device=device),
            torch.randn(B, H, Tk, D, dtype=dtype, device=device))


@pytest.mark.parametrize('kwargs, args, error, match', [
    (dict(D=8), (0.1, 0.5), ValueError, 'head dim 8 is outside the supported 16..256'),
    (dict(D=272), (0.1, 0.5), ValueError, 'head dim 272 is outside'),
    (dict(D=32), (0.1, 0.3), ValueError, 'theta=0.3 with head dim 32 gives an amplitude part of 9.6'),
    (dict(D=32), (0.1, 1.0), ValueError, 'both must be positive whole numbers'),
    (dict(Tq=9, Tk=8), (0.1, 0.5), ValueError, '9 queries but only 8 keys'),
    (dict(), (0.0, 0.5), ValueError, 'alpha=0.0 must be a finite number > 0'),
    (dict(), (0.1, 0.5, 'cubic'), ValueError, "phase='cubic' must be 'quadratic' or 'linear'"),
    (dict(dtype='float64'), (0.1, 0.5), TypeError, 'float64: use attn_impl'),
    (dict(), (0.1, 0.5), ValueError, 'runs on CUDA GPUs only'),
])
def test_bad_input_errors(tt, kwargs, args, error, match):
    import torch
    if kwargs.get('dtype'):
        kwargs = dict(kwargs, dtype=getattr(torch, kwargs['dtype']))
    with pytest.raises(error, match=match.replace('(', r'\(').replace(')', r'\)').replace('.', r'\.')):
        tt.tapa_attention_triton(*qkv(**kwargs), *args)


def test_bad_block_size_and_shapes(tt):
    q, k, v = qkv()
    with pytest.raises(ValueError, match='powers of two >= 16'):
        tt.tapa_attention_triton(q, k, v, 0.1, 0.5, block_m=24)
    with pytest.raises(ValueError, match='must be 4-D'):
        tt.tapa_attention_triton(q[0], k[0], v[0], 0.1, 0.5)
    with pytest.raises(ValueError, match='matching q'):
        tt.tapa_attention_triton(q, k[:, :1], v[:, :1], 0.1, 0.5)


def test_is_available_matches_the_machine(tt):
    import torch
    assert tt.is_available() == (torch.cuda.is_available() and torch.version.hip is None)


def test_auto_picks_the_kernel_only_where_it_runs(tt, monkeypatch):
    """attn_impl='auto': the kernel on an NVIDIA GPU for the head dims and dtypes it takes; PyTorch's
    paths otherwise (an AMD GPU, which PyTorch also calls 'cuda'; head dim 8; float64)."""
    import torch
    import fast_attention as model  # pick_tapa_impl lives in the engine
    monkeypatch.setitem(sys.modules, 'tapa_triton', tt)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 6))  # an RTX 30xx
    gpu, cpu = torch.device('cuda'), torch.device('cpu')
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 64, torch.bfloat16) == 'triton'
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 256, torch.float32) == 'triton'
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))  # a T4
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 256, torch.float32) == 'chunked'  # 64 KB: no fit
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 256, torch.float16) == 'triton'
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 8, torch.bfloat16) == 'chunked'
    assert model.pick_tapa_impl('auto', gpu, 64, 64, 64, torch.float64) == 'naive'
    assert model.pick_tapa_impl('auto', cpu, 512, 512, 64, torch.float32) == 'chunked'
    assert model.pick_tapa_impl('naive', gpu, 512, 512, 64, torch.bfloat16) == 'naive'
    # Triton 3.0 - 3.3 cannot compile the float16 backward for Turing: the chunked path there, and a
    # clear error for attn_impl='triton'
    monkeypatch.setattr(tt, 'TRITON_VERSION', (3, 3))
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 64, torch.float16) == 'chunked'
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 64, torch.float32) == 'triton'
    assert 'use float32 inputs, a newer Triton' in tt.turing_problem(64, torch.float16, gpu)
    assert 'use a newer Triton' in tt.turing_problem(256, torch.float16, gpu)  # float32 does not fit there
    assert 'float16 inputs (with Triton 3.4 or later)' in tt.turing_problem(256, torch.float32, gpu)
    monkeypatch.setattr(tt, 'TRITON_VERSION', (3, 4))
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 64, torch.float16) == 'triton'
    assert tt.turing_problem(256, torch.float16, gpu) is None
    assert tt.turing_problem(256, torch.float32, gpu).endswith("use float16 inputs or attn_impl='chunked'")
    monkeypatch.setattr(tt, 'TRITON_VERSION', (3, 3))
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 6))
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 64, torch.float16) == 'triton'
    assert tt.turing_problem(256, torch.float32, gpu) is None
    monkeypatch.setattr(torch.version, 'hip', '6.2')
    assert model.pick_tapa_impl('auto', gpu, 512, 512, 64, torch.bfloat16) == 'chunked'


def test_default_backward_follows_pytorch_deterministic_mode(tt, monkeypatch):
    """deterministic=None (the default): the single-pass backward (atomics) where it was measured
    faster -- Hopper, bfloat16, head dims 64 to 128 -- with its wide dK/dV tiles, unless PyTorch's
    deterministic mode is on (PyTorch's own rule for its FlashAttention backward: with warn_only=True
    it stays non-deterministic and warns); the two-kernel backward everywhere else. Explicit True /
    False win over both."""
    import torch

    def backward_of(D, dtype, capability, deterministic=None):
        cfg, launch = tt._launch_config(torch.empty(1, 1, 1, D, dtype=dtype), D // 2, None, None, None, None,
                                        deterministic=deterministic, capability=capability)
        return cfg['ATOMIC_DQ'], (launch['dkdv']['BLOCK_M'], launch['dkdv']['BLOCK_N'], launch['dkdv']['num_warps'])

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    hopper, ampere, blackwell = (9, 0), (8, 0), (12, 0)
    assert backward_of(64, bf16, hopper) == (True, (64, 128, 8))
    assert backward_of(128, bf16, hopper) == (True, (32, 128, 8))
    assert backward_of(96, bf16, hopper) == (True, (32, 128, 8))  # padded to 128
    assert backward_of(64, bf16, ampere) == (False, (32, 64, 4))
    assert backward_of(64, bf16, blackwell) == (False, (32, 64, 4))
    assert backward_of(64, fp16, hopper) == (False, (32, 64, 4))
    assert backward_of(64, fp32, hopper)[0] is False
    assert backward_of(32, bf16, hopper)[0] is False
    assert backward_of(256, bf16, hopper)[0] is False
    assert backward_of(64, bf16, hopper, deterministic=True) == (False, (32, 64, 4))
    assert backward_of(128, bf16, hopper, deterministic=True) == (False, (32, 64, 4))
    assert backward_of(64, bf16, ampere, deterministic=False) == (True, (32, 64, 4))  # not the wide tiles
    assert backward_of(64, fp16, hopper, deterministic=False) == (True, (32, 64, 4))
    with deterministic_mode():
        assert backward_of(64, bf16, hopper) == (False, (32, 64, 4))
        assert backward_of(128, bf16, hopper) == (False, (32, 64, 4))
        assert backward_of(64, bf16, hopper, deterministic=False)[0] is True
    with deterministic_mode(warn_only=True), pytest.warns(UserWarning, match='non-deterministic backward'):
        assert backward_of(64, bf16, hopper) == (True, (64, 128, 8))
    # and tapa_attention_triton's default reaches _launch_config as None, to be decided there
    seen = []

    def launch_config(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get('deterministic'))
        raise KeyboardInterrupt  # stop before any kernel
    monkeypatch.setattr(tt, '_INTERPRETED', True)  # CPU tensors accepted
    monkeypatch.setattr(tt, '_launch_config', launch_config)
    for kwargs in ({}, dict(deterministic=True), dict(deterministic=0)):
        with pytest.raises(KeyboardInterrupt):
            tt.tapa_attention_triton(*qkv(), 0.1, 0.5, **kwargs)
    assert seen == [None, True, False]


def test_launch_policy_traces_under_torch_compile(tt):
    """train.py compiles the model on a GPU, and torch.compile traces tapa_attention_triton down to the
    kernel launch (which it leaves alone): the choice of backward and tiles must trace as Python
    constants, without a graph break (fullgraph=True fails on one), and follow a later switch of
    PyTorch's deterministic mode (the compiled code is guarded on it)."""
    import torch

    def scaled_by_policy(q):
        cfg, launch = tt._launch_config(q, 32, None, None, None, None, deterministic=None, capability=(9, 0))
        return q * (2.0 if cfg['ATOMIC_DQ'] else 3.0) + launch['dkdv']['BLOCK_N']
    compiled = torch.compile(scaled_by_policy, fullgraph=True, backend='eager')
    q = torch.ones(1, 1, 4, 64, dtype=torch.bfloat16)
    assert compiled(q)[0, 0, 0, 0].item() == 2.0 + 128  # single pass, 64 x 128 tiles
    with deterministic_mode():
        assert torch.compile(scaled_by_policy, backend='eager')(q)[0, 0, 0, 0].item() == 3.0 + 64
    torch._dynamo.reset()


def test_tiles_that_old_triton_compiles_for_hopper(tt, monkeypatch):
    """Triton 3.0 and 3.1 (torch 2.4 and 2.5) crash compiling for Hopper (1) the forward at head dims
    above 64 with 64-row blocks (a wgmma for P @ V) and (2) the float16 single pass's dK/dV with 32 x 64
    tiles: there the forward takes 32-row blocks and that dK/dV 64 x 64 or 32 x 32, which they compile
    (checked by compiling with those Triton versions: `python tests/test_tapa_triton_compile.py --worker
    --all`); other GPUs, dtypes, head dims and Triton versions keep their tiles."""
    import torch
    hopper, ampere = (9, 0), (8, 0)
    bf16, fp16 = torch.bfloat16, torch.float16
    for version, dtype, D, capability, single_pass, fwd, dkdv in [
            ((3, 0), bf16, 128, hopper, False, (32, 64, 4), (32, 64, 4)),
            ((3, 1), fp16, 128, hopper, False, (32, 64, 4), (32, 64, 4)),
            ((3, 1), bf16, 256, hopper, False, (32, 32, 8), (16, 16, 4)),
            ((3, 0), fp16, 64, hopper, True, (64, 64, 4), (64, 64, 4)),
            ((3, 1), fp16, 128, hopper, True, (32, 64, 4), (32, 32, 4)),
            ((3, 0), bf16, 64, hopper, True, (64, 64, 4), (64, 128, 8)),
            ((3, 0), bf16, 128, hopper, True, (32, 64, 4), (32, 128, 8)),
            ((3, 2), fp16, 128, hopper, True, (64, 64, 4), (32, 64, 4)),
            ((3, 2), bf16, 128, hopper, False, (64, 64, 4), (32, 64, 4)),
            ((3, 9), bf16, 256, hopper, False, (64, 32, 8), (16, 16, 4)),
            ((3, 0), fp16, 64, hopper, False, (64, 64, 4), (32, 64, 4)),
            ((3, 0), fp16, 128, ampere, True, (64, 64, 4), (32, 32, 4)),
            ((3, 0), fp16, 64, ampere, True, (64, 64, 4), (32, 64, 4))]:
        monkeypatch.setattr(tt, 'TRITON_VERSION', version)
        tiles = tt._tile_sizes(dtype, D, capability, single_pass=single_pass)
        assert (tiles['fwd'], tiles['dkdv']) == (fwd, dkdv), (version, dtype, D, capability, single_pass, tiles)


def test_without_triton(monkeypatch):
    """tapa_triton must import without Triton (model.py asks it is_available()), then say what is missing."""
    monkeypatch.setitem(sys.modules, 'triton', None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, 'triton.language', None)
    spec = importlib.util.spec_from_file_location('tapa_triton_without_triton', os.path.join(ROOT, 'tapa_triton.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.is_available() is False
    with pytest.raises(RuntimeError, match='needs Triton'):
        module.tapa_attention_triton(*qkv(), 0.1, 0.5)


if __name__ == '__main__' and '--worker' in sys.argv:
    os.environ['TRITON_INTERPRET'] = '1'  # before tapa_triton (or triton) is imported
    sys.path.insert(0, ROOT)
    import triton
    import triton.language as tl
    import tapa_triton

    @triton.jit
    def loop_kernel(X, n):  # X[i] = n + i for program i, summed in a loop whose bound is a runtime value
        i = tl.program_id(0)
        total = 0.0
        for _ in range(0, n + i):
            total += 1.0
        tl.store(X + i, total)

    @triton.jit
    def cos_sin_kernel(T, C, S, N: tl.constexpr):
        offs = tl.arange(0, N)
        c, s = tapa_triton._cos_sin_2pi(tl.load(T + offs))
        tl.store(C + offs, c)
        tl.store(S + offs, s)

    worker()
