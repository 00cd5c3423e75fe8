"""Dictionary learning at frontier scale: cache activations, train feature-sharded SAEs, evaluate, publish."""

import logging

__version__ = "0.1.0"

# transformers imports torchao (our optim.state_dtype=fp8/int8) whenever it is installed, and torchao
# logs a WARNING per CUDA-only kernel library it cannot load on a CPU machine: noise in every stage.
logging.getLogger("torchao").setLevel(logging.ERROR)
