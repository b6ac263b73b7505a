# Tiny byte-level PG-19 model with the fire positional encoding; everything else is in tiny_base.py
# (its learning rate is not tuned for this encoding yet).
#     python train.py configs/tiny_fire.py
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'fire'
out_dir = 'out-tiny-fire'
