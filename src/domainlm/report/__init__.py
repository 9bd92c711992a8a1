"""`domainlm report`: the run's evidence as one self-contained HTML page (html.py) built from charts (plots.py)."""

from domainlm.report.html import build_report, print_report

__all__ = ["build_report", "print_report"]
