# Tiny byte-level PG-19 model with the learned positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_learned.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'learned'
out_dir = 'out-tiny-learned'
