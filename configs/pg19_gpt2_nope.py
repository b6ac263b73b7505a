# GPT-2 small (124M) on PG-19 with the nope positional encoding, one 24 GB GPU; see pg19_gpt2_base.py.
#     python train.py configs/pg19_gpt2_nope.py
from configs.pg19_gpt2_base import *  # noqa: F401,F403

pos_encoding = 'nope'
out_dir = 'out-pg19-nope'
