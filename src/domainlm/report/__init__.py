"""`domainlm report`: the run's evidence as one self-contained HTML page (html.py) built from charts (plots.py).

The sections come from the stage registry: `domainlm.pipeline.build_report` builds the page of a run."""

from domainlm.report.html import print_report

__all__ = ["print_report"]
