# The shared settings of the GPU configs (pg19_gpt2_tapa.py, pg19_gpt2_rope.py, ...): a GPT-2 small
# sized model (124M parameters) trained on PG-19 with the GPT-2 BPE, sized for ONE 24 GB consumer
# GPU (RTX 3090 / 4090). Each pg19_gpt2_<pe>.py imports this file and sets the positional encoding,
# its learning rate and out_dir. Prepare the data first (full PG-19: ~11 GB of text to download):
#     python data/pg19/prepare.py --tokenizer gpt2
dataset = 'pg19'
tokenizer = 'gpt2'

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = False

# Tokens per optimizer step: batch_size x block_size x gradient_accumulation_steps
#   = 8 x 1024 x 64 = 524,288 (~0.5M, GPT-2 small's batch).
# Memory (bf16 autocast, rough): weights + gradients + AdamW moments in fp32 = 124M x 16 bytes ~ 2 GB.
# Activations per 1024-token sequence, with a fused attention kernel (FlashAttention for RoPE/ALiBi/
# NoPE/learned, the Triton kernel or the chunked path for TAPA): ~34 x n_embd x T x n_layer bytes
# (Korthikanti et al. 2022) ~ 0.3 GB, plus the logits, 1024 x 50304 x ~10 bytes (bf16, fp32 copy
# for the loss, its gradient) ~ 0.5 GB: ~0.8 GB per sequence, ~6.5 GB for 8, ~9 GB in all.
# That leaves room on 24 GB; try batch_size = 12 or 16 (and gradient_accumulation_steps = 43 or 32)
# if your card has it free. Do not train TAPA with attn_impl = 'naive' here: it keeps the 1024 x 1024
# score matrices of every head (~3-4 GB per sequence).
# For a 2048 context: block_size = 2048, batch_size = 4 (same tokens per step, similar memory).
batch_size = 8
gradient_accumulation_steps = 64

# 5,000 steps x 0.5M = 2.6B tokens, about one pass over PG-19's training set (~2B words).
# Compute: ~6 x 124M + 12 x n_layer x n_embd x T ~ 0.86 GFLOP per token, ~2.3e18 FLOPs in all:
# at 40% of an RTX 4090's 165 bf16 TFLOPS, ~10 hours; about twice that on a 3090. These are
# estimates, not measurements; TAPA is slower than the others (no FlashAttention for it).
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 250
learning_rate = 6e-4  # GPT-2 small's; the TAPA config lowers it
min_lr = 6e-5         # learning_rate / 10
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250
eval_iters = 100      # 100 x 8 x 1024 = 0.8M validation tokens per estimate
log_interval = 10

device = 'auto'
dtype = 'auto'        # bfloat16 on Ampere (30xx) and newer; float16 + loss scaling on older cards
compile = 'auto'      # torch.compile on CUDA
