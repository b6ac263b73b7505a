# GPT-2 small (124M) on PG-19 with TAPA, one 24 GB GPU; see pg19_gpt2_base.py.
#     python train.py configs/pg19_gpt2_tapa.py
from configs.pg19_gpt2_base import *  # noqa: F401,F403

pos_encoding = 'tapa'
tapa_alpha = 0.1   # the paper's defaults
tapa_theta = 0.5
out_dir = 'out-pg19-tapa'
# The paper's TAPA exactly (tapa_phase_scale = 1, quadratic phase) at the others' learning rate. The paper
# trained TAPA at a 5x lower rate than RoPE (at 7B); we do not: on a CPU, with GPT-2's BPE and head dim 64
# (4 layers of width 256, 300 steps, 2 seeds: python experiments/gpt2_tapa_setting.py), 1.2e-4 was 0.56
# nats per token behind 6e-4 at the end, while at 6e-4 the paper's phase learned as fast as the small-model
# setting (6.12 vs 6.11; RoPE 5.98). Not measured at 124M, nor past 300 steps (docs/small_scale_study.md).
# If the loss stalls near the bigram level, try --tapa_phase_scale=0.05 (the small-model setting).
learning_rate = 6e-4
min_lr = 6e-5
