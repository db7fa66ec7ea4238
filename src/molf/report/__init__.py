"""``molf report``: what a run (or several) did, as an HTML page, Markdown and PNGs.

The data behind each figure is exposed so it can be checked against the logs:
:func:`routing_matrix` (``routing.jsonl``), :func:`load_run` (``train_log.jsonl``,
``eval.json``, ``config.yaml``) and :func:`metrics_tables`.
"""

from molf.jsonl import read_jsonl
from molf.report.page import write_report
from molf.report.routing import heatmap_rows, share_series
from molf.report.runs import Run, load_run
from molf.report.tables import metrics_tables
from molf.routing_log import RoutingMatrix, routing_matrix

__all__ = [
    "Run",
    "RoutingMatrix",
    "heatmap_rows",
    "load_run",
    "metrics_tables",
    "read_jsonl",
    "routing_matrix",
    "share_series",
    "write_report",
]
