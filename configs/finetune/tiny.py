# Light long-context fine-tuning of a tiny model (configs/tiny_*.py, context 128) to 4x its context,
# on CPU. Settings for finetune_long.py (not train.py: that is why this lives in configs/finetune/).
#     python finetune_long.py configs/finetune/tiny.py --init_dir=out-tiny-tapa
#     python finetune_long.py configs/finetune/tiny.py --init_dir=out-tiny-rope --rope_scaling=yarn
#     python finetune_long.py configs/finetune/tiny.py --init_dir=out-tiny-rope --rope_base=5e5
# The model, data and tokenizer come from the pretrained checkpoint; batch_size shrinks to 4 so a step
# still holds 16 x 128 = 2,048 tokens (4 windows of 512).
factor = 4
max_iters = 200       # a few hundred steps, as in PI/YaRN, scaled to a model that saw ~2M tokens
warmup_iters = 20
lr_scale = 0.1        # peak lr = 0.1 x the pretraining peak (1e-3 -> 1e-4), cosine to 1e-5
weight_decay = 0.0
eval_interval = 50
device = 'cpu'
