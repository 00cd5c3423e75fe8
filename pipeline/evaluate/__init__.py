"""Stage 3a: how much of the model's behaviour an SAE explains, on held-out tokens.

    python -m pipeline.evaluate checkpoint=runs/demo/train/topk/sae n_tokens=50000

Output: <out_dir>/metrics.json (reconstruction, sparsity, downstream loss) and
<out_dir>/density_histogram.png. `Dictionary` is the SAE adapter the interpretation and steering
stages share."""

from pipeline.evaluate.config import EvalConfig
from pipeline.evaluate.dictionary import Dictionary
from pipeline.evaluate.run import evaluate, run

__all__ = ["Dictionary", "EvalConfig", "evaluate", "run"]
