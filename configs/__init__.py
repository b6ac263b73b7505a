# Makes configs/ a package, so a config can share settings with `from configs.tiny_base import *`.
