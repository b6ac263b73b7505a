# Makes `data` importable as a package, so prepare scripts and train/eval scripts can share
# data/common.py: `from data.common import load_split, read_meta`.
