"""
How fast, and how much memory: forward + backward of attention with each positional encoding,
alone and inside a whole transformer Block, at growing context lengths.

Compared, on whatever device is present:
    rope_sdpa     RoPE + PyTorch's fused scaled_dot_product_attention: the bar to reach
    nope_sdpa     the same fused attention without any positional encoding (RoPE's own cost shows)
    alibi_sdpa, t5_sdpa, kerple_sdpa, fire_sdpa   the additive biases on the same path (the bias made a
                  block of queries at a time; FIRE's is its MLP on every (query, key) pair of the block),
                  xpos_sdpa RoPE with its decay: each encoding's model.py function
    cope          CoPE's own attention function, model.cope_attention: no fused kernel knows its summed
                  gates, so with gradients (what is timed here) the reference runs whole, its Tq x Tk
                  scores, gates and positions in memory (only evaluation runs it a block of queries at a time)
    tapa_naive    TAPA (Eq. 12) with the Tq x Tk scores materialized: the readable reference
    tapa_chunked  exact TAPA in tiles with its own backward: memory linear in T
    tapa_triton   the fused Triton kernel (only where tapa_triton.is_available())

$ python bench.py                                  # defaults picked for the device present
$ python bench.py --lengths 512,1024 --batch 4     # a quick look
$ python bench.py --what attn --impls rope_sdpa,tapa_chunked --repeats 9

Timing: a warmup run, then the median of --repeats runs; the cases of one length are timed in
turn (rope, nope, tapa, rope, nope, tapa, ...), so that a burst of load from something else on the
machine hits all of them alike, and the ratios to rope_sdpa compare runs made side by side.
On a CPU shared with other jobs, wall time is noisy and PyTorch's OpenMP threads can wait on each
other for whole scheduler time slices (every op is a parallel region: the many small ops of the
chunked path suffer most). Two ways to get steadier numbers there: --threads 1 --clock cpu (the CPU
time this process used), or OMP_WAIT_POLICY=PASSIVE in the environment (threads sleep instead of
spinning while they wait).
Peak memory: printed with the method used (CUDA: the caching allocator's own peak counter; CPU:
the peak resident memory of a fresh process, see cpu_peak_memory below).
Results also go to --out as JSON.
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback

import torch

import fast_attention
import model
import runtime

IMPLS = ['rope_sdpa', 'nope_sdpa', 'alibi_sdpa', 't5_sdpa', 'kerple_sdpa', 'fire_sdpa', 'xpos_sdpa', 'cope',
         'tapa_naive', 'tapa_chunked', 'tapa_triton']
WHATS = ['attn', 'block']

# -----------------------------------------------------------------------------
# the cases: each is a function that runs forward + backward once


def make_case(what, impl, L, args, device, dtype):
    """Build inputs for one case and return a function that runs its forward and backward once."""
    B, H, D = args.batch, args.n_head, args.head_dim
    pos_encoding = impl.split('_')[0]
    attn_impl = impl.split('_')[1] if pos_encoding == 'tapa' else 'auto'
    cfg = model.GPTConfig(n_layer=1, n_head=H, n_embd=H * D, block_size=L, vocab_size=256, bias=False,
                          pos_encoding=pos_encoding, attn_impl=attn_impl,
                          tapa_alpha=args.alpha, tapa_theta=args.theta, tapa_phase=args.phase)
    model.check_config(cfg)
    pe = model.PE_TABLE[pos_encoding]
    tables = tuple(t.to(device) for t in pe.tables(cfg, D, L, device)) if pe.tables else None  # RoPE's, xPos's
    positions = torch.arange(L, device=device)
    pos = model.Positions(q=positions, k=positions, tables=tables)
    params = pe.params(cfg).to(device) if pe.params else None  # ALiBi's slopes, T5's table, FIRE's MLP, ...
    g = torch.Generator(device='cpu').manual_seed(0)

    def randn(*shape, requires_grad=False):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(requires_grad)

    if what == 'attn':
        q, k, v = (randn(B, H, L, D, requires_grad=True) for _ in range(3))
        grad_out = randn(B, H, L, D)

        def attention(q, k, v):
            if pos_encoding == 'tapa':
                return fast_attention.tapa_attention(q, k, v, args.alpha, args.theta, args.phase, impl=attn_impl,
                                                     **({'chunk_size': args.chunk_size} if args.chunk_size else {}))
            return pe.attend(q, k, v, pos, params, cfg)  # the encoding's attention function (SDPA, or CoPE's own)

        def run():
            out = attention(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad_out)
        return run

    block = model.Block(cfg).to(device, dtype)
    shared_pe = params if pe.shared else None  # (per-layer parameters are the block's own)
    weights = list(block.parameters())
    x = randn(B, L, H * D, requires_grad=True)
    grad_out = randn(B, L, H * D)

    def run():
        y = block(x, pos, shared_pe)
        torch.autograd.grad(y, [x] + weights, grad_out)
    return run


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def is_oom(e):
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e) \
        or 'out of memory' in str(e).lower()


# -----------------------------------------------------------------------------
# peak memory
#
# CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was allocated
#   just before the run (the inputs and weights): exactly the bytes the forward + backward added at
#   their peak, counted by the allocator itself.
# CPU: PyTorch keeps no such counter for CPU tensors, so each case runs once more in a fresh process
#   (python bench.py --_memory_case ...): it builds the inputs, does one warmup run, then resets the
#   kernel's resident-memory high-water mark (writing 5 to /proc/self/clear_refs) and reports
#   VmHWM (peak RSS during the run) minus VmRSS right before it. glibc's malloc would otherwise keep
#   freed memory around and reuse it unseen, so that process runs with MALLOC_MMAP_THRESHOLD_=65536
#   and MALLOC_TRIM_THRESHOLD_=0: every large tensor gets its own mapping, returned to the kernel
#   on free, and RSS follows the live tensors. Resolution: a few dozen pages (the kernel's RSS
#   counters are per CPU and read approximately). The same process is also the memory cap: it
#   limits its address space (RLIMIT_AS) to what it had plus --max_mem_gb, so a case that needs
#   more fails with an allocation error, reported as 'skipped', instead of swapping or waking the
#   OOM killer. Both include the gradients the backward returns (same for every case).


def read_proc_status():
    fields = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, value = line.partition(':')
            if key in ('VmRSS', 'VmHWM', 'VmSize'):
                fields[key] = int(value.split()[0]) * 1024  # kB -> bytes
    return fields


def cpu_peak_memory(run, max_mem_bytes):
    """Runs in the fresh process: returns the peak extra resident bytes of one forward + backward."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = read_proc_status()['VmSize'] + max_mem_bytes + (512 << 20)  # + slack for thread stacks/arenas
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    run()  # warmup: one-time allocations (thread pools, kernel caches) are not the operation's
    gc.collect()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset VmHWM to the current RSS
    before = read_proc_status()['VmRSS']
    run()
    # The kernel keeps these counters per CPU and reads them approximately (off by up to a few dozen
    # pages), so a case that adds less than that can read as a little below zero: that is 0.
    return max(0, read_proc_status()['VmHWM'] - before)


def memory_case_main(spec):
    """Entry point of the fresh process: print one JSON line {status, mem_bytes}."""
    args = argparse.Namespace(**spec['args'])
    torch.set_num_threads(args.threads)
    device, dtype = torch.device('cpu'), getattr(torch, args.dtype)
    cap = int(args.max_mem_gb * 2**30)
    try:
        run = make_case(spec['what'], spec['impl'], spec['L'], args, device, dtype)
        result = {'status': 'ok', 'mem_bytes': cpu_peak_memory(run, cap)}
        if result['mem_bytes'] > cap:  # it fitted in the address-space limit's slack, not in the cap
            result = {'status': 'skipped', 'error': f"needs {result['mem_bytes'] / 2**30:.2f} GB > "
                                                    f"--max_mem_gb {args.max_mem_gb:g}"}
    except Exception as e:  # noqa: BLE001 - any failure is reported, the parent goes on
        result = {'status': 'skipped' if is_oom(e) else 'error', 'error': str(e).splitlines()[0][:200]}
    print(json.dumps(result))


def measure_cpu_memory(what, impl, L, args):
    spec = {'what': what, 'impl': impl, 'L': L, 'args': vars(args)}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--_memory_case', json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        killed = proc.returncode < 0 or proc.returncode == 137
        return {'status': 'OOM' if killed else 'error', 'error': proc.stderr.strip()[-300:]}
    return json.loads(lines[-1])


def measure_cuda_memory(run, device):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# -----------------------------------------------------------------------------
# device description


def describe_device(device):
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"{runtime.cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, " \
           f"CPU capability {torch.backends.cpu.get_cpu_capability()}"


def triton_available():
    try:
        import tapa_triton
        return bool(tapa_triton.is_available())
    except ImportError:
        return False


# -----------------------------------------------------------------------------
# the benchmark


def bench_length(what, L, impls, args, device, dtype, results):
    """Memory of each case, then the time of all cases that fit, interleaved."""
    runs = {}
    for impl in impls:
        r = {'what': what, 'impl': impl, 'L': L, 'status': 'ok', 'time_ms': None, 'mem_mb': None}
        results.append(r)
        try:
            if device.type == 'cpu':
                m = measure_cpu_memory(what, impl, L, args)
                r['status'] = m['status']
                if m['status'] != 'ok':
                    r['error'] = m.get('error', '')
                    if m['status'] == 'error':  # a bug or a bad setting, not a size limit: say which
                        print(f"{what} {impl} L={L}: {r['error']}", file=sys.stderr, flush=True)
                    continue
                r['mem_mb'] = m['mem_bytes'] / 2**20
                runs[impl] = (make_case(what, impl, L, args, device, dtype), r)
            else:
                run = make_case(what, impl, L, args, device, dtype)
                run()  # warmup (and Triton / cuBLAS autotuning) outside the measurement
                r['mem_mb'] = measure_cuda_memory(run, device) / 2**20
                runs[impl] = (run, r)
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                r['status'] = 'skipped' if args.capped else 'OOM'
            else:  # a bug, not a size limit: show it, go on with the other cases, exit with 1 at the end
                traceback.print_exc()
                r['status'] = 'error'
            r['error'] = str(e).splitlines()[0][:200]
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    # warmup every case, then time them round-robin
    times = {impl: [] for impl in runs}
    cpu_times = {impl: [] for impl in runs}

    def run_or_drop(impl):
        """One run of a case; False (and the case dropped, marked OOM) if it ran out of memory: the
        memory check passed but the real run did not fit, or a GPU's free memory fragmented."""
        run, r = runs[impl]
        try:
            run()
            return True
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            r['status'], r['error'] = 'OOM', str(e).splitlines()[0][:200]
            del runs[impl]
            return False

    for impl, (run, r) in list(runs.items()):
        for _ in range(args.warmup):
            sync(device)
            t0 = time.perf_counter()
            if not run_or_drop(impl):
                break
            sync(device)
            r['warmup_s'] = time.perf_counter() - t0
    slow = any(r.get('warmup_s', 0) > args.slow_s for _, r in runs.values())
    repeats = min(args.repeats, 3) if slow else args.repeats
    for _ in range(repeats):
        for impl in list(runs):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if not run_or_drop(impl):
                continue
            sync(device)
            times[impl].append(time.perf_counter() - t0)
            cpu_times[impl].append(time.process_time() - c0)
    for impl, (run, r) in runs.items():
        r['wall_ms'] = [1000 * t for t in times[impl]]
        r['cpu_ms'] = [1000 * t for t in cpu_times[impl]]
        r['time_ms'] = statistics.median(r['cpu_ms' if args.clock == 'cpu' else 'wall_ms'])
    return results


def fmt(r, key):
    if r is None:
        return '-'
    if r['status'] != 'ok':
        return r['status']
    return f"{r[key]:.1f}" if r[key] is not None else '-'


def print_tables(results, what, lengths, impls, clock):
    by = {(r['impl'], r['L']): r for r in results if r['what'] == what}
    w = max(12, max(len(i) for i in impls) + 1)

    def table(title, cell):
        print(f"\n{title}")
        print(f"{'L':>6} " + ''.join(f"{i:>{w}}" for i in impls))
        for L in lengths:
            print(f"{L:>6} " + ''.join(f"{cell(by.get((i, L)), by.get(('rope_sdpa', L))):>{w}}" for i in impls))

    def ratio(r, ref, key):
        if r is None or r['status'] != 'ok' or ref is None or ref['status'] != 'ok' or not ref[key]:
            return fmt(r, key) if r is not None and r['status'] != 'ok' else '-'
        return f"{r[key] / ref[key]:.2f}x"

    table(f"[{what}] forward+backward time, ms (median, {clock} clock)", lambda r, ref: fmt(r, 'time_ms'))
    table(f"[{what}] time / rope_sdpa time (same run)", lambda r, ref: ratio(r, ref, 'time_ms'))
    table(f"[{what}] peak extra memory, MiB", lambda r, ref: fmt(r, 'mem_mb'))
    table(f"[{what}] memory / rope_sdpa memory", lambda r, ref: ratio(r, ref, 'mem_mb'))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto', help="'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1'")
    p.add_argument('--dtype', default='auto', help="'auto' (bfloat16 on CUDA, float32 on CPU) or a torch dtype name")
    p.add_argument('--lengths', default=None,
                   help='comma-separated context lengths (default: 512..8192 on CPU, 512..16384 on CUDA)')
    p.add_argument('--what', default='attn,block', help="'attn' (attention alone), 'block' (a whole Block) or both")
    p.add_argument('--impls', default=','.join(IMPLS), help=f'comma-separated subset of {IMPLS}')
    p.add_argument('--batch', type=int, default=None, help='batch size (default: 1 on CPU, 4 on CUDA)')
    p.add_argument('--n_head', type=int, default=None, help='heads (default: 8 on CPU, 16 on CUDA)')
    p.add_argument('--head_dim', type=int, default=64)
    p.add_argument('--alpha', type=float, default=0.1)
    p.add_argument('--theta', type=float, default=0.5)
    p.add_argument('--phase', default='quadratic')
    p.add_argument('--chunk_size', type=int, default=None,
                   help="TAPA chunked tile size, attention alone only (default: tapa_attention's, as the Block uses)")
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--slow_s', type=float, default=10.0, help='a length whose slowest case takes longer than this '
                   'gets at most 3 repeats')
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    p.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                   help="'wall': elapsed time (what you wait for); 'cpu': CPU time of this process (CPU only), "
                        "steadier on a machine shared with other jobs, but summed over threads, so use it with "
                        "--threads 1")
    p.add_argument('--max_mem_gb', type=float, default=None,
                   help='memory cap per case; above it a case is skipped (default: 6 on CPU, none on CUDA)')
    p.add_argument('--out', default='bench_results.json')
    p.add_argument('--_memory_case', default=None, help=argparse.SUPPRESS)
    return p


def main():
    p = build_parser()
    args = p.parse_args()
    if args._memory_case is not None:
        return memory_case_main(json.loads(args._memory_case))

    # sizes that argparse's type=int lets through but that mean nothing (0 would quietly become the
    # default for --batch and --chunk_size, and --repeats 0 leaves nothing to take a median of)
    for name in ('batch', 'n_head', 'head_dim', 'chunk_size', 'repeats', 'threads'):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} {value}: must be at least 1")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be at least 0")
    if args.max_mem_gb is not None and not args.max_mem_gb > 0:
        p.error(f"--max_mem_gb {args.max_mem_gb:g}: must be more than 0")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out}: is a folder; give the path of the JSON file to write")
    try:  # fail now, not after the whole benchmark
        runtime.check_writable(os.path.splitext(args.out)[0])
    except runtime.TrainError as e:
        p.error(f"--out {args.out}: {e}")
    if args.lengths is not None:
        try:
            lengths = [int(x) for x in args.lengths.split(',') if x.strip()]
        except ValueError:
            lengths = []
        if not lengths or min(lengths) < 1:
            p.error(f"--lengths {args.lengths}: expected comma-separated positive integers, e.g. --lengths 512,1024")

    try:
        device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                              'cpu' if args.device == 'auto' else args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device name; use auto, cpu, cuda or cuda:N")
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False; use --device cpu")
    on_gpu = device.type == 'cuda'
    if args.dtype == 'auto':
        args.dtype = 'bfloat16' if on_gpu else 'float32'
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype) or not getattr(torch, args.dtype).is_floating_point:
        sys.exit(f"--dtype {args.dtype!r} is not a floating-point torch dtype (try float32, bfloat16, float16)")
    dtype = getattr(torch, args.dtype)
    args.batch = args.batch or (4 if on_gpu else 1)
    args.n_head = args.n_head or (16 if on_gpu else 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if on_gpu and args.clock == 'cpu':
        sys.exit("--clock cpu measures CPU time, which says nothing about GPU kernels; use --clock wall on CUDA")
    if args.lengths is None:  # (given ones were parsed and checked above)
        lengths = [512, 1024, 2048, 4096, 8192] + ([16384] if on_gpu else [])
    whats = args.what.split(',')
    impls = args.impls.split(',')
    for name, values, allowed in (('--what', whats, WHATS), ('--impls', impls, IMPLS)):
        bad = [x for x in values if x not in allowed]
        if bad:
            sys.exit(f"{name}: unknown {bad}; choose from {allowed}")
    if 'tapa_triton' in impls and not (on_gpu and triton_available()):
        impls = [i for i in impls if i != 'tapa_triton']
        if not impls:  # nothing left to run
            sys.exit(f"--impls tapa_triton: the Triton kernel needs a CUDA GPU and Triton (pip install triton), "
                     f"and this run has {'no Triton' if on_gpu else 'device ' + str(device)}; "
                     f"choose from {[i for i in IMPLS if i != 'tapa_triton']}")
        print("tapa_triton: not available here (needs CUDA and Triton), left out")
    if on_gpu:
        total = torch.cuda.get_device_properties(device).total_memory
        args.capped = args.max_mem_gb is not None and args.max_mem_gb * 2**30 < total
        if args.capped:
            torch.cuda.set_per_process_memory_fraction(args.max_mem_gb * 2**30 / total, device)
    else:
        args.max_mem_gb = args.max_mem_gb or 6.0
        args.capped = True
    args.lengths = lengths

    device_name = describe_device(device)
    memory_method = ('torch.cuda.max_memory_allocated() minus memory_allocated() just before the run'
                     if on_gpu else
                     'fresh process per case: peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS just '
                     'before the run, one warmup run first, glibc malloc set to return freed memory '
                     '(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0)')
    print(f"device: {device_name}")
    print(f"dtype {args.dtype}, batch {args.batch}, heads {args.n_head}, head dim {args.head_dim}, "
          f"TAPA alpha={args.alpha} theta={args.theta} phase={args.phase}, torch {torch.__version__}")
    load_start = os.getloadavg()  # other jobs on the machine: recorded with the results
    if not on_gpu:
        print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; load average "
              f"{' '.join(f'{x:.1f}' for x in load_start)} at start")
    print(f"timing ({args.clock} clock): {args.warmup} warmup run(s), then median of {args.repeats} repeats, cases interleaved; "
          f"memory: {memory_method}; cap {args.max_mem_gb} GB per case")

    results = []
    for what in whats:
        for L in lengths:
            bench_length(what, L, impls, args, device, dtype, results)
            done = [r for r in results if r['what'] == what and r['L'] == L]
            print(f"  {what} L={L}: " + ', '.join(
                f"{r['impl']} {fmt(r, 'time_ms')} ms / {fmt(r, 'mem_mb')} MiB" for r in done), flush=True)
        print_tables(results, what, lengths, impls, args.clock)

    for r in results:
        ref = next((x for x in results if x['what'] == r['what'] and x['L'] == r['L'] and x['impl'] == 'rope_sdpa'), None)
        if r['status'] == 'ok' and ref is not None and ref['status'] == 'ok':
            r['time_vs_rope_sdpa'] = r['time_ms'] / ref['time_ms']
            r['mem_vs_rope_sdpa'] = r['mem_mb'] / ref['mem_mb'] if ref['mem_mb'] else None
    out = {'device': device_name, 'device_type': device.type, 'torch': torch.__version__,
           'config': {k: v for k, v in vars(args).items() if not k.startswith('_')}, 'impls_run': impls,
           'load_average': {'start': load_start, 'end': os.getloadavg()},
           'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
           'memory_method': memory_method, 'results': results}
    with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    failed = sorted({f"{r['what']} {r['impl']}" for r in results if r['status'] == 'error'})
    if failed:
        sys.exit(f"errors (not out of memory) in: {', '.join(failed)}; see above and the 'error' fields in {args.out}")


if __name__ == '__main__':
    main()
