"""
Generate text from a trained checkpoint.

    python sample.py --out_dir=out-quickstart
    python sample.py --out_dir=out-quickstart --start="def fibonacci(n):" --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=out-pg19-tapa --start=FILE:prompt.txt --temperature=0.7 --top_k=50

The tokenizer (byte or gpt2) is the one the checkpoint was trained with. Generation uses the model's
KV cache: each new token costs one forward pass of one token, not of the whole text so far.
"""

import os
import sys

import torch
from torch.nn import functional as F

import fast_attention
from configurator import ConfigError, get_overrides
from tokenizer import get_tokenizer
from runtime import TrainError, autocast_for, load_checkpoint, model_from_checkpoint, pick_device, pick_dtype

# -----------------------------------------------------------------------------
out_dir = 'out'            # the folder holding ckpt.pt
start = '\n'               # the prompt, or FILE:path to read it from a file ('' = start from end-of-text)
num_samples = 3
max_new_tokens = 500       # tokens to generate per sample
temperature = 0.8          # < 1 sharper, > 1 more random; 0 = always the most likely token
top_k = 200                # sample among the k most likely tokens only (0 = all of them)
seed = 1337
device = 'auto'            # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', ...
dtype = 'auto'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    """Sample max_new_tokens after idx (B, T) (temperature 0 = greedy), one token at a time against
    a KV cache. Learned position embeddings stop at block_size (an error); the others go on."""
    cache = model.new_kv_cache()
    logits, _ = model(idx, kv_cache=cache)
    for step in range(max_new_tokens):
        logits = logits[:, -1, :].float()
        if temperature == 0:  # greedy decoding
            idx_next = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
        if step + 1 < max_new_tokens:
            logits, _ = model(idx_next, kv_cache=cache)
    return idx


def main(argv):
    """Print num_samples samples and return them as a list of strings."""
    cfg = {**DEFAULTS, **get_overrides(DEFAULTS, argv, doc=__doc__)}
    if cfg['num_samples'] < 1 or cfg['max_new_tokens'] < 1 or cfg['temperature'] < 0 or cfg['top_k'] < 0:
        raise ConfigError("num_samples and max_new_tokens must be >= 1, temperature and top_k >= 0")
    if 0 < cfg['temperature'] < 1e-4:  # logits / temperature must stay finite (1e-45 makes them inf)
        raise ConfigError(f"temperature={cfg['temperature']:g}: use 0 for greedy decoding, or 1e-4 or more")
    prompt = cfg['start']
    if prompt.startswith('FILE:'):  # read it first: a wrong path should not wait for the checkpoint to load
        try:
            with open(prompt[5:], encoding='utf-8') as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--start={cfg['start']}: cannot read the prompt file {prompt[5:]!r} "
                              f"({getattr(e, 'strerror', None) or e}); FILE: takes the path of a UTF-8 text "
                              f"file") from None
    dev = pick_device(cfg['device'])
    dtype = pick_dtype(cfg['dtype'], dev, training=False)  # (no loss scaling to need: float16 is fine)
    autocast = autocast_for(dev, dtype)
    checkpoint = load_checkpoint(os.path.join(cfg['out_dir'], 'ckpt.pt'))
    # the tokenizer the model was trained with (older checkpoints: guess it from the vocabulary size)
    tokenizer = get_tokenizer(checkpoint['config'].get('tokenizer') or
                              ('byte' if checkpoint['model_args']['vocab_size'] <= 256 else 'gpt2'))
    model = model_from_checkpoint(checkpoint)
    model.eval().to(dev)
    print(fast_attention.describe(model, dev, getattr(torch, dtype)), file=sys.stderr)  # stderr: stdout is the samples
    del checkpoint  # the optimizer state is big and of no use here

    # allow_eot: a literal '<|endoftext|>' in the prompt means "a new document starts here"
    ids = tokenizer.encode(prompt, allow_eot=True) or [tokenizer.eot_token]
    # the model sees the prompt and every new token but the last (which is sampled, never fed back)
    longest = len(ids) + cfg['max_new_tokens'] - 1  # (max_new_tokens >= 1, checked above)
    block_size = model.config.block_size
    if model.config.pos_encoding == 'learned' and longest > block_size:
        fix = (f"lower max_new_tokens to at most {block_size - len(ids) + 1}" if len(ids) <= block_size else
               "shorten the prompt")
        raise ConfigError(f"learned position embeddings stop at block_size={block_size}, but the prompt "
                          f"({len(ids)} tokens) plus max_new_tokens={cfg['max_new_tokens']} needs {longest} "
                          f"positions: {fix} (the other positional encodings have no such limit)")
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None, :]

    torch.manual_seed(cfg['seed'])
    samples = []
    with torch.no_grad(), autocast:
        for _ in range(cfg['num_samples']):
            y = generate(model, x, cfg['max_new_tokens'], temperature=cfg['temperature'], top_k=cfg['top_k'] or None)
            samples.append(tokenizer.decode(y[0].tolist()))
            print(samples[-1])
            print('---------------')
    return samples


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainError) as e:
        sys.exit(f"error: {e}")
