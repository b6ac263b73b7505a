# Tiny byte-level PG-19 model with TAPA in the setting recommended for small models (see
# docs/small_scale_study.md); configs/tiny_tapa.py is the paper's exact setting, which stalls at this size.
#     python train.py configs/tiny_tapa_small.py
#
# The one change to the model: tapa_phase_scale = 0.05 multiplies the phase phi of Eq. 12. That is a
# reparametrization (the same as scaling the phase rows of the q projection by 0.05), so the model
# is still exactly TAPA; under AdamW it makes the phase projections start 20x smaller and move 20x
# slower, so the amplitude (content) attention learns first and the phase does not turn into noise.
# With the phase tamed, a higher peak learning rate (that of RoPE here) trains well.
from configs.tiny_base import *  # noqa: F401,F403

pos_encoding = 'tapa'
tapa_phase_scale = 0.05
learning_rate = 2e-3
min_lr = 2e-4
out_dir = 'out-tiny-tapa-small'
