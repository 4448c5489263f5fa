"""Plain-text tables for reports and benchmarks (markdown, no extra dependency)."""
from __future__ import annotations


def markdown_table(rows: list[dict]) -> str:
    """[{col: value}, ...] -> a GitHub markdown table (columns of the first row, in order)."""
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)
