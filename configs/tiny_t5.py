# Tiny byte-level PG-19 model with the t5 positional encoding; everything else is in tiny_base.py
# (its learning rate is not tuned for this encoding yet).
#     python train.py configs/tiny_t5.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 't5'
out_dir = 'out-tiny-t5'
