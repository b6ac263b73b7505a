# Tiny byte-level PG-19 model with the xpos positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_xpos.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'xpos'
# peak learning rate: experiments/lr_sweep.py's best of 1e-3, 2e-3, 4e-3, 8e-3 at 1,000 steps, on the validation
# books (docs/small_scale_study.md, "Learning rates of the tiny configs"); min_lr a tenth of it
learning_rate = 0.004
min_lr = 0.0004
out_dir = 'out-tiny-xpos'
