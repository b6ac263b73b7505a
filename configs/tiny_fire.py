# Tiny byte-level PG-19 model with the fire positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_fire.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'fire'
# peak learning rate: experiments/lr_sweep.py's best of 1e-3, 2e-3, 4e-3, 8e-3 at 1,000 steps, on the validation
# books (docs/small_scale_study.md, "Learning rates of the tiny configs"); min_lr a tenth of it.
# 8e-3 is the edge of that grid: a larger rate may be better still (not measured)
learning_rate = 0.008
min_lr = 0.0008
out_dir = 'out-tiny-fire'
