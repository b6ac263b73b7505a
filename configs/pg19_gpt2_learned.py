# GPT-2 small (124M) on PG-19 with the learned positional encoding, one 24 GB GPU; see pg19_gpt2_base.py.
#     python train.py configs/pg19_gpt2_learned.py
from configs.pg19_gpt2_base import *  # noqa: F401,F403

pos_encoding = 'learned'
out_dir = 'out-pg19-learned'
