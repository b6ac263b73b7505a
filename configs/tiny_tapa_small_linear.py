# Tiny byte-level PG-19 model with TAPA in the small-model setting (configs/tiny_tapa_small.py) and
# the paper's linear phase (its ablation): phi = (sum of q_P + sum of k_P) / sqrt(d_P) instead of
# q_P.k_P / sqrt(d_P). At this scale it fit better than the quadratic phase in every run we made
# (3 seeds at 1,000 steps, and at 2,000 steps), with the same extrapolation; see
# docs/small_scale_study.md.
#     python train.py configs/tiny_tapa_small_linear.py
from configs.tiny_tapa_small import *  # noqa: F401,F403

tapa_phase = 'linear'
# peak learning rate: experiments/lr_sweep.py's best of 1e-3, 2e-3, 4e-3 at 1,000 steps, on the validation
# books (docs/small_scale_study.md, "Learning rates of the tiny configs"); min_lr a tenth of it
learning_rate = 0.002
min_lr = 0.0002
out_dir = 'out-tiny-tapa-small-linear'
