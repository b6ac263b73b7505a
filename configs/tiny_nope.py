# Tiny byte-level PG-19 model with the nope positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_nope.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'nope'
out_dir = 'out-tiny-nope'
