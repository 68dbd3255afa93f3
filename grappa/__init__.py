"""grappa-pipeline: granularity-aware adaptation of a frozen retrieval backbone (Grappa, ECCV 2022)."""

__version__ = "0.1.0"
