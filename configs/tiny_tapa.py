# Tiny byte-level PG-19 model with the tapa positional encoding; everything else is in tiny_base.py.
#     python train.py configs/tiny_tapa.py
# This is the paper's exact setting (phase scale 1), which stalls at this size near the bigram level
# (its attention stays nearly uniform): to compare TAPA with the other encodings here, use the
# small-model setting, configs/tiny_tapa_small.py (docs/small_scale_study.md).
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'tapa'
out_dir = 'out-tiny-tapa'
