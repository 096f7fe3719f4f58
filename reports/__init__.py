"""Comparison reports: one autoescaped HTML page with matplotlib PNGs and a merged records.csv."""
from reports.render import build_report, records_frame

__all__ = ["build_report", "records_frame"]
