# Tiny byte-level PG-19 model with the rope positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_rope.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'rope'
out_dir = 'out-tiny-rope'
