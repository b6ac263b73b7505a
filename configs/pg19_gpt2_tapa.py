# GPT-2 small (124M) on PG-19 with TAPA, one 24 GB GPU; see pg19_gpt2_base.py.
#     python train.py configs/pg19_gpt2_tapa.py
from configs.pg19_gpt2_base import *  # noqa: F401,F403

pos_encoding = 'tapa'
tapa_alpha = 0.1   # the paper's defaults
tapa_theta = 0.5
out_dir = 'out-pg19-tapa'
# A lower peak learning rate than the other encodings: the paper trained TAPA at 5x lower than RoPE
# (at 7B parameters). We keep their ratio; it has not been tuned at this size.
learning_rate = 1.2e-4
min_lr = 1.2e-5
# The paper's exact setting (tapa_phase_scale = 1). If the loss stalls near the bigram level, as it
# does for the 0.8M-parameter CPU models, try --tapa_phase_scale=0.05 --learning_rate=6e-4 --min_lr=6e-5
# (docs/small_scale_study.md); not measured at this size.
