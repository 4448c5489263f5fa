"""Plain-text tables for reports and benchmarks (markdown, no extra dependency)."""
from __future__ import annotations


def markdown_table(rows: list[dict]) -> str:
    """[{col: value}, ...] -> a GitHub markdown table (every row's columns, in order of first appearance;
    a row without a column leaves its cell empty)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)
