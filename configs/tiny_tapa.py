# Tiny byte-level PG-19 model with the tapa positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_tapa.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'tapa'
out_dir = 'out-tiny-tapa'
