"""Write one benchmark's section into docs/BENCHMARKS.md without touching the others."""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

from micon.tables import markdown_table  # noqa: F401  (re-exported for the benchmarks)

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEvery number here was produced by the command shown with it, on the machine "
          "shown with it. Rerun the command to refresh its section.\n")


def machine() -> str:
    """A one-line description of where a benchmark ran."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # torch absent or broken: the benchmark may not need it
        gpu = "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}, {platform.system()}"


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_section(title: str, body: str, path: Path = DOC) -> None:
    """Replace (or append) the `## title` section of docs/BENCHMARKS.md."""
    stamp = datetime.date.today().isoformat()
    section = (f"## {title}\n\nCommand: `{command()}`  \nMachine: {machine()}  \nDate: {stamp}\n\n"
               f"{body.strip()}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
