"""
What activation checkpointing saves: peak memory of one training step (forward + backward) of the
tiny config (configs/tiny_base.py: 4 layers, width 128) at a long context, with and without
activation_checkpointing, each in a fresh process (peak RSS on the CPU, peak allocated on a GPU),
with the ratio measured side by side in one run.

    python experiments/activation_memory.py                      # T = 2048, batch 4, tapa and rope
    python experiments/activation_memory.py --T=4096 --pes=tapa --device=cuda
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE_STEP = """
import json, sys, torch
sys.path.insert(0, {root!r})
import bench, model
torch.manual_seed(0)
cfg = model.GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size={T}, vocab_size=256, pos_encoding={pe!r},
                      activation_checkpointing={on})
device = torch.device({device!r})
gpt = model.GPT(cfg).to(device)
idx = torch.randint(0, 256, ({batch}, {T}), generator=torch.Generator().manual_seed(1)).to(device)
losses = []

def run():
    gpt.zero_grad(set_to_none=False)  # the gradients' memory exists before and after: not the step's
    _, loss = gpt(idx, idx)
    loss.backward()
    losses.append(loss.item())
run()  # gradients allocated
if device.type == 'cuda':
    run(); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
    run(); torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - before
else:
    peak = bench.cpu_peak_memory(run, 16 << 30)  # (a warm-up run, then the measured one)
print(json.dumps({{'peak_mib': peak / 2**20, 'loss': losses[-1]}}))
"""
# bench.py's way of reading CPU memory: every large tensor its own mapping, returned on free
MALLOC = {'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '0'}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--T', type=int, default=2048)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--pes', default='tapa,rope')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    print(f"one training step of the tiny config at T={args.T}, batch {args.batch}, on {args.device}:")
    for pe in args.pes.split(','):
        peaks = {}
        for on in (False, True):
            code = ONE_STEP.format(root=ROOT, T=args.T, pe=pe, on=on, device=args.device, batch=args.batch)
            out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                                 env={**os.environ, **MALLOC})
            peaks[on] = json.loads(out.stdout.strip().splitlines()[-1])
        assert abs(peaks[True]['loss'] - peaks[False]['loss']) < 1e-5  # the same step
        print(f"  {pe:5s} peak {peaks[False]['peak_mib']:8.1f} MiB without, {peaks[True]['peak_mib']:8.1f} MiB with "
              f"activation checkpointing: {peaks[True]['peak_mib'] / peaks[False]['peak_mib']:.2f}x")


if __name__ == '__main__':
    main()
