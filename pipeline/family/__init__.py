"""Scaling Monosemanticity in miniature: a family of dictionaries of growing size trained on the same
tokens of a multilingual offline corpus, evaluated, interpreted, audited, published, and reported.

    python -m pipeline.family                      # make family: corpus -> cache -> train x sizes -> report
    python -m pipeline.family sizes=[64,256] n_tokens=20000 test_tokens=4000   # a small one

Output contract: FamilyConfig.out_dir (pipeline/family/config.py); the report is results.md with its
figures (pipeline/family/report.py).
"""

from pipeline.family.config import FamilyConfig
from pipeline.family.run import run

__all__ = ["FamilyConfig", "run"]
