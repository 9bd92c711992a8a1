"""`domainlm scaling --points FILE.csv`: fit a scaling law to points measured elsewhere, no training.

The CSV has a header with the columns ``params,tokens,loss`` and optionally ``flops`` (the budget a point
belongs to, which groups the IsoFLOP curves for approach 2). Without ``flops``, points are grouped by
C = 6·N·D: sorted by C, a point within 10% of the previous one joins its group (an IsoFLOP sweep's D is rounded
to whole steps, so its 6·N·D scatters around the budget by much less than that). Other columns are ignored.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from domainlm.errors import UserError
from domainlm.outputs import Law
from domainlm.rundir import RunDir, write_json
from domainlm.scaling.fit import fit_law
from domainlm.scaling.plot import plot_scaling, usable_law

REQUIRED = ("params", "tokens", "loss")
SAME_BUDGET = 1.10  # 6·N·D within 10% of the previous point: the same IsoFLOP curve


def read_points(path: Path) -> list[dict]:
    """Rows {params, tokens, loss, flops, budget}; a bad file or value is a one-line error naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--points {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"--points {path}: expected a CSV file, got a folder") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--points {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise UserError(f"{path}:1: empty file; expected a header with columns params,tokens,loss[,flops]")
    cols = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise UserError(f"{path}:1: header {','.join(cols)!r} lacks column(s) {', '.join(missing)}; "
                        "expected params,tokens,loss and optionally flops")
    wanted = [*REQUIRED, "flops"] if "flops" in cols else list(REQUIRED)
    rows = []
    for line_no, rec in enumerate(reader, start=2):
        if not rec or all(not v.strip() for v in rec):
            continue  # blank line
        if len(rec) != len(cols):
            raise UserError(f"{path}:{line_no}: {len(rec)} fields, the header has {len(cols)}")
        row = {}
        for c in wanted:
            raw = rec[cols.index(c)].strip()
            try:
                v = float(raw)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"{path}:{line_no}: column {c!r}: expected a positive number, got {raw!r}")
            row[c] = v
        row["line"] = line_no
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no data rows after the header")
    if "flops" not in cols:
        _group_by_6nd(rows)
    for r in rows:
        r["budget"] = r["flops"]
    return rows


def _group_by_6nd(rows: list[dict]) -> None:
    """flops = the geometric mean of 6·N·D over each group of points within SAME_BUDGET of each other."""
    order = sorted(rows, key=lambda r: r["params"] * r["tokens"])
    groups: list[list[dict]] = []
    for r in order:
        c = 6.0 * r["params"] * r["tokens"]
        if groups and c <= 6.0 * groups[-1][-1]["params"] * groups[-1][-1]["tokens"] * SAME_BUDGET:
            groups[-1].append(r)
        else:
            groups.append([r])
    for g in groups:
        c = math.exp(sum(math.log(6.0 * r["params"] * r["tokens"]) for r in g) / len(g))
        for r in g:
            r["flops"] = c


def fit_points(path: Path, *, law_out: Path | None = None, n_boot: int = 100) -> dict:
    """Fit approaches 2 and 3 (with bootstrap intervals) and write law.json (default: next to the CSV)."""

    path = Path(path)
    rows = read_points(path)
    law = fit_law(rows, n_boot=n_boot)
    law.update(params_counted="total", loss="as given in the CSV", source=str(path),
               budgets=sorted({r["flops"] for r in rows}),
               budgets_from="flops column" if "flops" in _header(path) else "6·N·D, grouped within 10%")
    law_path = Path(law_out) if law_out else path.with_name(Path(RunDir.LAW).name)
    write_json(law_path, Law.checked(law))
    plot = plot_scaling(rows, law, usable_law(law_path), law_path.with_name(law_path.stem + ".png"))
    return {"law": law, "law_path": str(law_path), "points_path": str(path), "plot": str(plot), "points": rows,
            "minutes": None, "config": None}


def _header(path: Path) -> list[str]:
    first = Path(path).read_text(encoding="utf-8-sig").splitlines()[0]
    return [h.strip().lower() for h in next(csv.reader([first]))]
