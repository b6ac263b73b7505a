"""
What verifying a checkpoint costs: the CRC check of every record (runtime.verify_archive) next to
the torch.load it precedes, on a checkpoint of the GPT-2-small configuration (configs/pg19_gpt2_base.py:
124M parameters plus AdamW's two moments, about 1.5 GB), written and read here.

    python experiments/checkpoint_check_cost.py            # writes a temporary file of ~1.5 GB
    python experiments/checkpoint_check_cost.py --small    # a 4-layer model instead, for a quick look

Times are wall clock on this machine, the file read from the page cache (just written) unless the
cache is dropped, so both numbers are the CPU's cost, not the disk's.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--small', action='store_true', help='a 4-layer, 256-wide model (seconds, not minutes)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    shape = dict(n_layer=4, n_head=4, n_embd=256) if args.small else dict(n_layer=12, n_head=12, n_embd=768)
    gpt = GPT(GPTConfig(block_size=1024, vocab_size=50304, pos_encoding='rope', **shape))
    optimizer = train.configure_optimizers(gpt, 0.1, 1e-4, (0.9, 0.95), 'cpu')
    gpt(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()  # AdamW's moments exist from the first step: the checkpoint has its real size
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    cfg = train.Settings(beta1=0.9, beta2=0.95, weight_decay=0.1)
    rngs = [runtime.rng_states(torch.Generator(), torch.device('cpu'))]
    checkpoint = runtime.training_checkpoint(gpt, optimizer, scaler, cfg, 0, float('inf'), rngs, 0.0)
    with tempfile.TemporaryDirectory() as folder:
        path = runtime.save_checkpoint(checkpoint, folder)
        size = os.path.getsize(path)
        del checkpoint, optimizer
        timings = {'verify_archive': [], 'torch.load': []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            runtime.verify_archive(path)
            t1 = time.perf_counter()
            torch.load(path, map_location='cpu', weights_only=True)
            t2 = time.perf_counter()
            timings['verify_archive'].append(t1 - t0)
            timings['torch.load'].append(t2 - t1)
    check, load = min(timings['verify_archive']), min(timings['torch.load'])
    print(f"checkpoint: {sum(p.numel() for p in gpt.parameters()) / 1e6:.1f}M parameters, {size / 2**30:.2f} GiB")
    print(f"CRC check {check:.2f} s ({size / 2**30 / check:.1f} GiB/s), torch.load {load:.2f} s: "
          f"the check adds {check / load:.2f}x a load (best of {args.repeats})")


if __name__ == '__main__':
    main()
