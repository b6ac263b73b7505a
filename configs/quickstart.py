# The CPU quick start: a small byte-level TAPA model on the pycode dataset (Python's standard
# library, prepared automatically on first use). About 3 minutes on 2 CPU cores (README.md, "Your
# first afternoon", has the measured time), and the loss visibly falls: from ln(256) = 5.5 (a random
# guess among 256 bytes) to about 2.1 nats per byte (2.09 in that run).
#     python train.py configs/quickstart.py
#     python sample.py --out_dir=out-quickstart --start="def "
out_dir = 'out-quickstart'
dataset = 'pycode'
tokenizer = 'byte'

# model: 0.8M parameters; TAPA (alpha 0.1, theta 0.5, quadratic phase) in the setting recommended
# for small models: phi scaled by 0.05, a reparametrization that keeps the phase from turning into
# noise before the model has learned anything (docs/small_scale_study.md)
pos_encoding = 'tapa'
tapa_phase_scale = 0.05
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0

# 16 sequences x 128 bytes = 2,048 tokens per step; 500 steps = 1M tokens (a tenth of the data)
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 500
# with the phase scaled down, TAPA trains at RoPE's peak learning rate (with the paper's exact
# setting, 2e-3 was unstable and 1e-3 stalled near 2.3)
learning_rate = 2e-3
warmup_iters = 50
lr_decay_iters = 500
min_lr = 2e-4
beta2 = 0.99  # a little smoothing: few tokens per step

eval_interval = 100
eval_iters = 10
log_interval = 10

compile = False  # a model this small trains faster than torch.compile compiles it
