"""Stage 4: publish exported SAEs with their evaluation as a release that SAELens and we can load,
to the Hugging Face Hub and/or any fsspec URL.

    python -m pipeline.publish checkpoints=[runs/demo/train/topk/sae] repo_id=my-org/smollm2-saes
    python -m pipeline.publish target=s3://bucket/releases/smollm2 dry_run=true

Output contract: the release layout (docs/release-format.md, pipeline/publish/release.py).
Loading back: pipeline.publish.load("hf://my-org/smollm2-saes/model.layers.15@main"), a local release
folder or an export (pipeline.sae.load reads exports only, and imports nothing of this stage).
"""

from pipeline.publish.config import PublishConfig
from pipeline.publish.hub import PublishAuthError, PublishIncompleteError
from pipeline.analysis.release import ReleaseIncompleteError, load
from pipeline.publish.run import MissingMetricsError, OutDirNotEmptyError, PublishResult, build, run

__all__ = ["MissingMetricsError", "OutDirNotEmptyError", "PublishAuthError", "PublishConfig", "PublishIncompleteError",
           "PublishResult", "ReleaseIncompleteError", "build", "load", "run"]
