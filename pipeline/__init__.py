"""Dictionary learning at frontier scale: cache activations, train feature-sharded SAEs, evaluate, publish.

Layers. The stages (cache, train, evaluate, interpret, steer, audit, publish, plan, scaling) each have
one entry point (`python -m pipeline.<stage>`) and talk only through storage. A stage imports only
lower layers, never another stage: analysis (what the analysis stages share: the dictionary adapter,
the input config, metrics, example collection, steering hook, HTML), sae, store, models, data,
vision, parallel, step (the training sections the trainer and the cost model share), cost_model,
heldout (a training run's outputs), demo, config, errors. The lower layers import no stage, and
pipeline.sae imports nothing above it. tests/test_layers.py checks this on the import graph.
"""

import logging

__version__ = "0.1.0"

# transformers imports torchao (our optim.state_dtype=fp8/int8) whenever it is installed, and torchao
# logs a WARNING per CUDA-only kernel library it cannot load on a CPU machine: noise in every stage.
logging.getLogger("torchao").setLevel(logging.ERROR)
