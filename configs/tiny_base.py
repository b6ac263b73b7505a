# The shared settings of the tiny CPU configs (tiny_tapa.py, tiny_rope.py, ...): a 0.8M-parameter
# byte-level model on PG-19 books. Each tiny_<pe>.py imports this file and changes only the
# positional encoding (and out_dir), so their losses compare the encodings and nothing else.
# Needs the data first: a download of the first 50 books of each split (README.md, "Your first
# afternoon", step 3), or --source DIR from a local folder of PG-19 books instead of the download:
#     python data/pg19/prepare.py --tokenizer byte --num_books 50 --splits train validation
dataset = 'pg19'
tokenizer = 'byte'

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0

# 16 x 128 = 2,048 tokens per step; 2,000 steps = 4M tokens
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 2000
learning_rate = 1e-3
warmup_iters = 100
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99

eval_interval = 200
eval_iters = 20
log_interval = 10

compile = False  # a model this small trains faster than torch.compile compiles it
