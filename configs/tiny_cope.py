# Tiny byte-level PG-19 model with the cope positional encoding; everything else is in tiny_base.py
# (its learning rate is not tuned for this encoding yet).
#     python train.py configs/tiny_cope.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'cope'
out_dir = 'out-tiny-cope'
