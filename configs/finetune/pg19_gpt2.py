# Long-context fine-tuning of a GPT-2 small PG-19 model (configs/pg19_gpt2_*.py, context 1024) to 4x
# its context (4096), on one 24 GB GPU. Settings for finetune_long.py.
#     python finetune_long.py configs/finetune/pg19_gpt2.py --init_dir=out-pg19-tapa
#     python finetune_long.py configs/finetune/pg19_gpt2.py --init_dir=out-pg19-rope --rope_scaling=yarn
# batch_size becomes 8 x 1024 / 4096 = 2 sequences per micro-batch, and gradient_accumulation_steps
# (64) comes from the pretrained run: 2 x 4096 x 64 = 0.5M tokens per step, as in pretraining.
# Steps, warmup and no weight decay follow YaRN's fine-tuning (Peng et al. 2023: 400 steps, 20 warmup).
factor = 4
max_iters = 400
warmup_iters = 20
lr_scale = 0.1        # 1/10 of the pretraining peak
weight_decay = 0.0
eval_interval = 100
