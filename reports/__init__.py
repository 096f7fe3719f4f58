"""Comparison reports: one autoescaped HTML page with matplotlib PNGs and a merged records.csv."""
from reports.frame import records_frame
from reports.render import build_report

__all__ = ["build_report", "records_frame"]
