"""Stage 3a: how much of the model's behaviour an SAE explains, on held-out tokens.

    python -m pipeline.evaluate input.checkpoint=runs/demo/train/topk/sae input.n_tokens=50000

Output: <out_dir>/metrics.json (reconstruction, sparsity, downstream loss; pipeline/analysis/metrics.py)
and <out_dir>/density_histogram.png."""

from pipeline.evaluate.config import EvalConfig
from pipeline.evaluate.run import HISTOGRAM_FILE, METRICS_FILE, run

__all__ = ["EvalConfig", "HISTOGRAM_FILE", "METRICS_FILE", "run"]
