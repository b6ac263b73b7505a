"""The fused kernels of tapa_triton.py compiled for real NVIDIA GPUs, without one.

test_tapa_triton.py checks the kernels' arithmetic in Triton's CPU interpreter. The interpreter runs
the Python of a kernel with NumPy; it does not go through the GPU compiler, which rejects things the
interpreter lets pass (a tl.dot of mixed dtypes, a layout it cannot lower, an unsupported precision
option) and is what actually runs on a GPU. Triton can compile ahead of time for a named target
(Ampere sm_80, Hopper sm_90) down to the cubin that the driver would load, using the ptxas shipped
in its wheel; no GPU or driver is involved. So here each kernel (forward, dK/dV, dQ) is compiled in
float16, bfloat16 and float32, both phase types, with the launch configuration that
tapa_attention_triton would pick on that GPU, and the test checks that it compiles and that its
matrix products became tensor-core instructions (mma on Ampere, wgmma or mma on Hopper), not a slow
scalar fallback.

It runs in a fresh Python process (this file, `--worker`) because the kernels must be defined with
TRITON_INTERPRET unset, and another test may have imported tapa_triton with it set.

    python tests/test_tapa_triton_compile.py --worker --all   # every head dim and GPU, with ptxas's
                                                              # register and spill report
    python tests/test_tapa_triton_compile.py --worker --sass  # instructions per score in the main loop
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec('triton') is not None

# (capability, dtype, head dim, phase): the test's set (about 3 s per kernel on one core). --all adds
# head dims 32, 128 and 256, Turing (sm_75, T4) and the consumer cards: sm_86 (RTX 30xx), sm_89 (RTX
# 40xx), sm_120 (RTX 50xx).
# A fifth element True: the single-pass backward (deterministic=False, dQ added with atomics).
CASES = [((9, 0), 'bfloat16', 64, 'quadratic'), ((9, 0), 'float16', 64, 'quadratic'),
         ((9, 0), 'float32', 64, 'quadratic'), ((8, 0), 'bfloat16', 128, 'linear'),
         ((9, 0), 'bfloat16', 64, 'linear', True), ((9, 0), 'bfloat16', 128, 'quadratic', True),
         ((8, 6), 'float32', 256, 'quadratic')]
ALL_CASES = [(cap, dtype, D, phase) for cap in ((7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0))
             for dtype in ('bfloat16', 'float16', 'float32') for D in (32, 64, 128, 256)
             for phase in ('quadratic', 'linear') if not (cap == (7, 5) and dtype == 'bfloat16')] + \
    [(cap, dtype, D, phase, True) for cap in ((8, 0), (9, 0)) for dtype in ('bfloat16', 'float16')
     for D in (64, 128) for phase in ('quadratic', 'linear')]  # and the single pass

# The most shared memory one program may use on each GPU (CUDA's "maximum shared memory per block,
# opt-in"): a kernel that needs more fails to launch there. The consumer cards have much less than the
# data-center ones. (Turing cannot fit float32 at head dim 256 with any tiles here: --all shows it.)
SHARED_MEMORY_LIMIT = {(7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024,
                       (9, 0): 227 * 1024, (12, 0): 99 * 1024}


TENSOR_ARGS = ('Q', 'K', 'V', 'O', 'DO', 'DQ', 'DK', 'DV')  # the kernels' tensors in the input dtype
FLOAT32_ARGS = ('LSE', 'DELTA', 'W')  # and those in float32 (log-sum-exp, Delta, distance weights)


def compile_case(cap, dtype_name, D, phase, atomic_dq=False, theta=0.5, report_registers=False, report_sass=False):
    """Worker side: compile the kernels for GPU `cap`; per kernel, what came out."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import tapa_triton as tt

    dtype = getattr(torch, dtype_name)
    d_amp, _ = tt.tapa_split(D, theta)
    # the launch configuration tapa_attention_triton picks, for this GPU instead of the local one
    cfg, launch = tt._launch_config(torch.empty(1, 1, 1, D, dtype=dtype), d_amp, None, None, None, None,
                                    deterministic=not atomic_dq, capability=cap)
    pointer = {'bfloat16': '*bf16', 'float16': '*fp16', 'float32': '*fp32'}[dtype_name]
    results = {}
    kernels = [('fwd', tt._tapa_fwd_kernel), ('dkdv', tt._tapa_bwd_dkdv_kernel)]
    if not atomic_dq:  # the single-pass backward has no dQ kernel
        kernels.append(('dq', tt._tapa_bwd_dq_kernel))
    for name, kernel in kernels:
        block_m, block_n = launch[name]['BLOCK_M'], launch[name]['BLOCK_N']
        options = {key: launch[name][key] for key in ('num_warps', 'num_stages', 'enable_fp_fusion', 'maxnreg') if key in launch[name]}
        # TQ_TAIL=False: the query length is a multiple of the dK/dV kernel's block, as in training
        # (True only adds the row tests of the last block's loads back)
        constants = dict(cfg, BLOCK_M=block_m, BLOCK_N=block_n, QUADRATIC=phase == 'quadratic', TQ_TAIL=False)
        signature, constexprs, attrs = {}, {}, {}
        for i, arg in enumerate(kernel.arg_names):
            runtime_specialized = not getattr(kernel.params[i], 'do_not_specialize', False)
            if runtime_specialized and (arg in TENSOR_ARGS or arg in FLOAT32_ARGS or arg.startswith('stride')
                                        or arg in ('H', 'Tq', 'Tk')):
                # what Triton assumes at run time of pointers and integers that are multiples of 16 (as
                # in every model here, and lengths such as 2048), unless the kernel opts out
                # (tapa_triton.LENGTHS): with it, loads become 16-byte vector loads
                attrs[(i,)] = [['tt.divisibility', 16]]
            if arg in constants:
                signature[arg] = 'constexpr'
                constexprs[(i,)] = constants[arg]
            elif arg in FLOAT32_ARGS or (arg == 'DQ' and atomic_dq):  # dQ's atomic buffer is float32
                signature[arg] = '*fp32'
            elif arg in TENSOR_ARGS:  # the tensors in the input dtype
                signature[arg] = pointer
            elif arg == 'amp_scale':
                signature[arg] = 'fp32'
            else:  # strides, H, Tq, Tk
                signature[arg] = 'i32'
        target = GPUTarget('cuda', cap[0] * 10 + cap[1], 32)
        compiled = triton.compile(ast_source(ASTSource, kernel, signature, constexprs, attrs), target=target,
                                  options=options)
        ptx = compiled.asm['ptx']
        out = dict(tiles=[block_m, block_n, options['num_warps']], cubin_bytes=len(compiled.asm['cubin']),
                   shared_bytes=compiled.metadata.shared,
                   mma=len(re.findall(r'\bmma\.sync', ptx)), wgmma=len(re.findall(r'\bwgmma\.mma_async', ptx)),
                   fma=len(re.findall(r'\bfma\.rn\.f32', ptx)),
                   atomics=len(re.findall(r'\b(?:red|atom)\.global', ptx)),
                   # the hardware cos / sin, and the asynchronous copies of fewer than 16 bytes (those of
                   # the distance-weight table: 4 bytes per score; K, V, Q, dO take 16-byte ones)
                   cos_sin=len(re.findall(r'\b(?:cos|sin)\.approx', ptx)),
                   small_async_copies=len(re.findall(r'\bcp\.async\.ca\b', ptx)))
        if report_registers:
            out.update(ptxas_report(ptx, cap))
        if report_sass:
            out.update(loop_instructions(compiled.asm['cubin'], block_m * block_n // (32 * options['num_warps'])))
        results[name] = out
    return results


def ast_source(ASTSource, kernel, signature, constexprs, attrs):
    """ASTSource in this Triton's API: newer Triton (3.3 on) takes constexprs= and attrs keyed by
    (index,); Triton 3.0 to 3.2 (torch 2.4 to 2.6) take the non-constexpr signature, constants by name
    and an AttrsDescriptor of the 16-divisible argument indices (3.2 builds it from hints)."""
    import inspect
    if 'constexprs' in inspect.signature(ASTSource).parameters:
        return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    from triton.compiler.compiler import AttrsDescriptor
    names = kernel.arg_names
    divisible = {i for (i,), a in attrs.items() if ['tt.divisibility', 16] in a and signature[names[i]] != 'constexpr'}
    descriptor = (AttrsDescriptor.from_hints({i: 16 for i in divisible}) if hasattr(AttrsDescriptor, 'from_hints')
                  else AttrsDescriptor(divisible_by_16=divisible))
    return ASTSource(kernel, {k: v for k, v in signature.items() if v != 'constexpr'},
                     {names[i]: v for (i,), v in constexprs.items()}, descriptor)


def ptxas_report(ptx, cap):
    """Registers per thread and spill bytes, from ptxas -v on the PTX (the ptxas inside Triton's wheel)."""
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(cap[0] * 10 + cap[1]).path  # newer GPUs take the newer ptxas in the wheel
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        open(src, 'w').write(ptx)
        arch = re.search(r'\.target\s+(sm_\w+)', ptx).group(1)  # e.g. sm_90a: what Triton compiled for
        log = subprocess.run([ptxas, '-v', f'--gpu-name={arch}', src, '-o', os.path.join(tmp, 'k.cubin')],
                             capture_output=True, text=True).stderr
    registers = re.search(r'Used (\d+) registers', log)
    spills = re.search(r'(\d+) bytes spill stores', log)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_bytes=int(spills.group(1)) if spills else None)


def loop_instructions(cubin, scores_per_thread):
    """The machine code of the kernel's main loop, the sweep over the blocks that need no causal mask
    (disassembled with the nvdisasm in Triton's wheel): instructions per score and the most frequent
    opcodes. Measured on an H200, a forward with 61 instructions per score issued about two thirds of
    what the GPU can issue (4 warp-instructions per clock per SM) in the time it took: the elementwise
    work, not the matmuls, bounds these kernels, and fewer instructions per score is faster."""
    import collections
    import tempfile
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'nvdisasm')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, '-c', f.name], capture_output=True, text=True).stdout
    ops, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = re.match(r'\s*(\.L_x_\d+):', line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = re.search(r'/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);', line)
        if ins:
            ops.append((ins.group(1).split('.')[0], ins.group(2)))
    for i, (op, rest) in enumerate(ops):  # a loop = a branch back to an earlier label
        target = re.search(r'(\.L_x_\d+)', rest) if op == 'BRA' else None
        if target and labels.get(target.group(1), i) < i:
            loops.append(collections.Counter(o for o, _ in ops[labels[target.group(1)]:i + 1]))
    if not loops:
        return {}
    body = min(loops, key=lambda c: sum(c.values()))  # the unmasked sweep (the masked one does more)
    return dict(loop_instructions_per_score=round(sum(body.values()) / scores_per_thread, 1),
                loop_top_ops={op: round(n / scores_per_thread, 1) for op, n in body.most_common(8)})


def ablation_worker(variant):
    """Worker side: experiments/triton_ablate.py's variant swapped in, the kernels compiled for sm_90."""
    sys.path.insert(0, os.path.join(ROOT, 'experiments'))
    import triton_ablate
    triton_ablate.use_variant(variant)
    print(json.dumps(compile_case((9, 0), 'bfloat16', 64, 'quadratic')))


@pytest.fixture(scope='module')
def compiled():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"compiling the kernels failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
@pytest.mark.parametrize('case', CASES, ids=lambda c: f'sm{c[0][0]}{c[0][1]}-{c[1]}-D{c[2]}-{c[3]}'
                                                     + ('-single-pass' if c[4:] else ''))
def test_kernels_compile_for_gpu(compiled, case):
    result = compiled[repr(case)]
    if 'error' in result:
        pytest.fail(f"{case}: {result['error']}")
    for kernel, out in result.items():
        assert out['cubin_bytes'] > 0, f"{case} {kernel}: empty cubin"
        # every kernel multiplies tiles (QK^T twice, P@V, the gradients): those must be tensor-core
        # instructions; float32 inputs go through them too, as three TF32 passes (tf32x3)
        assert out['mma'] + out['wgmma'] > 0, f"{case} {kernel}: no tensor-core instruction in the PTX ({out})"
        assert out['shared_bytes'] <= SHARED_MEMORY_LIMIT[case[0]], f"{case} {kernel}: too much shared memory ({out})"
    single_pass = case[4:] == (True,)
    # the single-pass backward adds dQ with atomics in the dK/dV kernel, and only there
    assert (result['dkdv']['atomics'] > 0) == single_pass, result['dkdv']
    assert result['fwd']['atomics'] == 0 and ('dq' in result) != single_pass


def worker(cases, report_registers, report_sass=False):
    import torch
    torch.set_num_threads(1)
    results = {}
    for case in cases:
        try:
            results[repr(case)] = compile_case(*case, report_registers=report_registers, report_sass=report_sass)
        except Exception as e:  # report it per case, so one failure does not hide the others
            results[repr(case)] = {'error': f'{type(e).__name__}: {e}'[:2000]}
        print(case, results[repr(case)], file=sys.stderr, flush=True)
    print(json.dumps(results))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
def test_ablation_variants_remove_what_they_say():
    """experiments/triton_ablate.py times the kernels with the distance-weight table or the hardware
    cos/sin swapped out. The swap must reach the compiled kernels (Triton resolves a kernel's helper
    functions when it compiles it), and remove that and nothing else."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['OMP_NUM_THREADS'] = '1'
    counts = {}
    for variant in ('baseline', 'no_table', 'no_cos'):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--ablation', variant], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    for kernel, base in counts['baseline'].items():
        no_table, no_cos = counts['no_table'][kernel], counts['no_cos'][kernel]
        assert base['cos_sin'] > 0 and no_cos['cos_sin'] == 0 and no_table['cos_sin'] == base['cos_sin'], kernel
        assert no_table['small_async_copies'] < base['small_async_copies'] == no_cos['small_async_copies'], kernel
        assert no_table['wgmma'] == no_cos['wgmma'] == base['wgmma'], kernel


if __name__ == '__main__' and '--ablation' in sys.argv:
    os.environ.pop('TRITON_INTERPRET', None)
    sys.path.insert(0, ROOT)
    ablation_worker(sys.argv[sys.argv.index('--ablation') + 1])

if __name__ == '__main__' and '--worker' in sys.argv:
    os.environ.pop('TRITON_INTERPRET', None)  # before tapa_triton (or triton) is imported
    sys.path.insert(0, ROOT)
    everything = '--all' in sys.argv
    worker(ALL_CASES if everything else CASES, report_registers=everything, report_sass='--sass' in sys.argv)
