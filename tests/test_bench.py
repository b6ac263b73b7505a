"""bench.py: its CPU memory measurement against allocations of known size, the memory cap (a case
that does not fit is reported, not a crash), and the JSON it writes. No timings are asserted."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import bench  # noqa: E402
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')  # as bench.py runs it


def run_python(code):
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cpu_peak_memory_sees_known_allocations():
    # 64 MiB live, then 32 MiB more on top (peak 96 MiB), then everything freed; and a run that only
    # ever holds 1 MiB at a time although it allocates 100 MiB in total
    out = run_python(
        "import torch, bench\n"
        "torch.set_num_threads(1)\n"
        "def peak():\n"
        "    a = torch.ones(64 << 18)\n"
        "    b = torch.ones(32 << 18)\n"
        "    del a, b\n"
        "def churn():\n"
        "    for _ in range(100):\n"
        "        x = torch.ones(1 << 18)\n"
        "print(bench.cpu_peak_memory(peak, 1 << 30) / 2**20, bench.cpu_peak_memory(churn, 1 << 30) / 2**20)\n")
    peak_mib, churn_mib = map(float, out.split())
    assert 94 <= peak_mib <= 100, peak_mib
    assert churn_mib <= 4, churn_mib


def test_case_over_the_memory_cap_is_skipped_not_a_crash(tmp_path):
    # naive TAPA at T = 4096 with 8 heads materializes ~0.5 GiB per T x T tensor: far above 0.1 GB
    out = tmp_path / 'b.json'
    proc = subprocess.run([sys.executable, 'bench.py', '--device', 'cpu', '--what', 'attn', '--lengths', '4096',
                           '--impls', 'tapa_naive', '--max_mem_gb', '0.1', '--threads', '1', '--out', str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(out.read_text())['results']
    assert r['status'] == 'skipped' and r['time_ms'] is None
    assert 'skipped' in proc.stdout


def test_small_run_writes_results_and_ratios(tmp_path):
    out = tmp_path / 'b.json'
    proc = subprocess.run([sys.executable, 'bench.py', '--device', 'cpu', '--what', 'attn', '--lengths', '64',
                           '--impls', 'rope_sdpa,tapa_chunked', '--repeats', '2', '--threads', '1',
                           '--n_head', '2', '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data['device_type'] == 'cpu' and 'logical CPUs' in data['device']
    results = {(r['impl'], r['L']): r for r in data['results']}
    assert set(results) == {(i, L) for i in ('rope_sdpa', 'tapa_chunked') for L in (64,)}
    for (impl, L), r in results.items():
        assert r['status'] == 'ok' and r['time_ms'] > 0 and len(r['wall_ms']) == 2 and r['mem_mb'] >= 0
        assert abs(r['time_vs_rope_sdpa'] - r['time_ms'] / results[('rope_sdpa', L)]['time_ms']) < 1e-9
    assert '/ rope_sdpa' in proc.stdout  # the ratio tables are printed



@pytest.mark.parametrize('what', ['attn', 'block'])
def test_every_row_runs_a_tiny_case(what):
    """Every row of IMPLS (bar the GPU-only kernel) builds and runs forward + backward at a tiny size, in
    this process: a row whose encoding changed its parameters or settings shows here, in seconds. And
    every encoding with an attention function of its own has a row (learned and sinusoidal positions
    use NoPE's attention, which nope_sdpa measures)."""
    import torch
    import model
    rows = {impl.split('_')[0] for impl in bench.IMPLS}
    own = {name for name, pe in model.PE_TABLE.items() if pe.attend is not model.attend_nope}
    assert own <= rows, f"no bench row for {sorted(own - rows)}"
    args = bench.build_parser().parse_args(['--n_head', '2', '--head_dim', '8', '--batch', '1'])
    torch.manual_seed(0)
    for impl in bench.IMPLS:
        if impl != 'tapa_triton':
            bench.make_case(what, impl, 24, args, torch.device('cpu'), torch.float32)()

def test_a_failing_case_is_reported_and_the_others_still_run(tmp_path):
    # an unknown TAPA phase makes every TAPA case fail (a ValueError, not a lack of memory): RoPE is
    # still measured, the TAPA row says 'error' with the reason, and the exit code says something failed
    out = tmp_path / 'b.json'
    proc = subprocess.run([sys.executable, 'bench.py', '--device', 'cpu', '--what', 'attn', '--lengths', '64',
                           '--impls', 'rope_sdpa,tapa_naive', '--repeats', '1', '--threads', '1', '--n_head', '2',
                           '--phase', 'cubic', '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert 'errors (not out of memory) in: attn tapa_naive' in proc.stderr
    assert "attn tapa_naive L=64: " in proc.stderr and 'cubic' in proc.stderr  # the reason, printed "above"
    results = {r['impl']: r for r in json.loads(out.read_text())['results']}
    assert results['rope_sdpa']['status'] == 'ok' and results['rope_sdpa']['time_ms'] > 0
    assert results['tapa_naive']['status'] == 'error' and 'cubic' in results['tapa_naive']['error']


@pytest.mark.parametrize('args, message', [
    (['--impls', 'tapa_triton'], 'tapa_triton: the Triton kernel needs a CUDA GPU and Triton'),
    (['--repeats', '0'], '--repeats 0: must be at least 1'),  # else: a median of nothing
    (['--lengths', '0'], '--lengths 0: expected comma-separated positive integers'),
    (['--lengths', 'abc'], '--lengths abc: expected comma-separated positive integers'),
    (['--batch', '0'], '--batch 0: must be at least 1'),  # else: quietly the default
    (['--chunk_size', '0'], '--chunk_size 0: must be at least 1'),
    (['--max_mem_gb', '-1'], '--max_mem_gb -1: must be more than 0'),  # else: every case "skipped", exit 0
    (['--dtype', 'int32'], "--dtype 'int32' is not a floating-point torch dtype"),
    (['--out', 'HERE'], 'is a folder; give the path of the JSON file'),  # else: only after the benchmark
])
def test_bad_arguments_are_clear_errors(tmp_path, monkeypatch, capsys, args, message):
    # a tiny case, so that a check that is missing shows as a (quick) run rather than a long one
    out = tmp_path / 'b.json'
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--device', 'cpu', '--what', 'attn', '--lengths', '64', '--impls',
                                      'rope_sdpa', '--n_head', '2', '--threads', '1', '--out', str(out)]
                        + [str(tmp_path) if a == 'HERE' else a for a in args])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code != 0
    assert message in f"{e.value.code}\n{capsys.readouterr().err}"
    assert not out.exists()


def test_case_just_over_the_memory_cap_is_skipped_too(tmp_path):
    # naive TAPA at T = 1024, 8 heads: ~200 MiB at its peak, twice a 0.1 GB cap but within the
    # address-space limit's slack (thread stacks, allocator arenas): the measured peak decides
    out = tmp_path / 'b.json'
    proc = subprocess.run([sys.executable, 'bench.py', '--device', 'cpu', '--what', 'attn', '--lengths', '1024',
                           '--impls', 'rope_sdpa,tapa_naive', '--max_mem_gb', '0.1', '--threads', '1', '--repeats', '1',
                           '--warmup', '0', '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    by = {r['impl']: r for r in result['results']}
    assert by['tapa_naive']['status'] == 'skipped' and 'needs 0.' in by['tapa_naive']['error'], by['tapa_naive']
    assert by['rope_sdpa']['status'] == 'ok' and by['rope_sdpa']['mem_mb'] < 100, by['rope_sdpa']
    assert result['impls_run'] == ['rope_sdpa', 'tapa_naive'] and len(result['load_average']['start']) == 3


def test_out_of_memory_while_timing_drops_only_that_case(monkeypatch):
    """A case that fits the memory check but runs out of memory in a timed repeat (on a GPU: free memory
    fragmented by the other cases) is marked OOM; the others are still timed and the run goes on."""
    import argparse
    import torch
    calls = {'tapa_naive': 0, 'rope_sdpa': 0}

    def make_case(what, impl, L, args, device, dtype):
        def run():
            calls[impl] += 1
            if impl == 'tapa_naive' and calls[impl] == 3:  # warmup, first repeat, then out of memory
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run
    monkeypatch.setattr(bench, 'make_case', make_case)
    monkeypatch.setattr(bench, 'measure_cpu_memory', lambda *a: {'status': 'ok', 'mem_bytes': 0})
    args = argparse.Namespace(warmup=1, repeats=4, slow_s=60.0, clock='wall')
    results = []
    bench.bench_length('attn', 64, ['rope_sdpa', 'tapa_naive'], args, torch.device('cpu'), torch.float32, results)
    by = {r['impl']: r for r in results}
    assert by['tapa_naive']['status'] == 'OOM' and 'out of memory' in by['tapa_naive']['error']
    assert by['rope_sdpa']['status'] == 'ok' and len(by['rope_sdpa']['wall_ms']) == 4
    assert calls == {'rope_sdpa': 5, 'tapa_naive': 3}


def gpu_check_commands():
    """The python commands experiments/gpu_check.sh runs: (script, arguments), with train()'s $1 made
    each encoding it is called with. Continuation lines joined; quotes as bash reads them."""
    import re
    import shlex
    with open(os.path.join(ROOT, 'experiments', 'gpu_check.sh')) as f:
        text = f.read().replace('\\\n', ' ')
    encodings = re.findall(r'^train (\w+)$', text, flags=re.M)
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] != ['step'] or 'python3' not in words:
            continue
        script, *args = words[words.index('python3') + 1:]
        for pe in (encodings if any('$1' in w for w in [script] + args) else [None]):
            commands.append((script, [a.replace('$1', pe) for a in args] if pe else args))
    return commands


def test_gpu_check_runs_only_flags_its_scripts_take():
    """experiments/gpu_check.sh is run on a borrowed GPU with minutes to spare: a flag that one of its
    scripts no longer takes would waste the session. Check every command's arguments here, on a CPU."""
    import importlib
    import train
    from configurator import get_overrides
    commands = gpu_check_commands()
    scripts = {script for script, _ in commands}
    assert {'bench.py', 'train.py', 'experiments/triton_tiles.py', 'experiments/triton_ablate.py'} <= scripts, scripts
    for script, args in commands:
        if script == 'bench.py':
            parsed = bench.build_parser().parse_args(args)
            assert set(parsed.impls.split(',')) <= set(bench.IMPLS), args
        elif script == 'experiments/triton_tiles.py':
            tiles = importlib.import_module('triton_tiles')
            parsed = tiles.build_parser().parse_args(args)
            assert set(parsed.kernels.split(',')) <= set(tiles.CANDIDATES), args
        elif script == 'experiments/triton_ablate.py':
            ablate = importlib.import_module('triton_ablate')
            parsed = ablate.build_parser().parse_args(args)
            assert set(parsed.variants.split(',')) <= set(ablate.VARIANTS), args
        elif script == 'train.py':
            assert os.path.exists(os.path.join(ROOT, args[0])), args[0]
            overrides = get_overrides(train.DEFAULTS, [os.path.join(ROOT, args[0])] + args[1:], train.OPTIONAL_TYPES)
            train.resolve_config(overrides)  # names, types and ranges, as train.py checks them
        elif script == '-m':
            assert args[0] == 'pytest', args
        else:
            assert os.path.exists(os.path.join(ROOT, script)), script
