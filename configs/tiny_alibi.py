# Tiny byte-level PG-19 model with the alibi positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_alibi.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'alibi'
out_dir = 'out-tiny-alibi'
