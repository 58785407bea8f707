"""Preference data: hub layouts and local copies (`source`), row adapters and images (`formats`).

The training driver uses `PairSource`, `check_source` and `skip_metrics` (re-exported here); evaluation
reads ranked groups through `pipeline.eval.groups`, which loads rows with the same code.
"""

from pipeline.data.source import NoUsableRows, PairSource, check_source, skip_metrics

__all__ = ["NoUsableRows", "PairSource", "check_source", "skip_metrics"]
