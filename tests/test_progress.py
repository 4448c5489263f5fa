"""micon.progress: plain progress lines (no carriage returns, no cursor codes) when stderr is not a terminal,
with the count out of the total, the rate and an ETA; tqdm's interface either way."""
from __future__ import annotations

import io

import pytest

from micon import progress


def test_plain_lines_carry_count_total_rate_and_eta(monkeypatch):
    fake = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: fake[0])
    out = io.StringIO()
    bar = progress.PlainBar(total=40, desc="top-k query blocks", unit="block", every=10, file=out)
    for _ in range(10):
        fake[0] += 1.5
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "top-k query blocks: 7/40 blocks (18%), 0.667 blocks/s, 10 s elapsed, ETA 50 s"
    assert lines[-1].startswith("top-k query blocks: 10/40 blocks (25%), 0.667 blocks/s, 15 s elapsed, ETA 45 s")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_iteration_and_the_tqdm_interface(monkeypatch):
    out = io.StringIO()
    seen = list(progress.PlainBar(range(5), desc="x", every=0, file=out))
    assert seen == list(range(5))
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("x: 5/5 its (100%)") and len(lines) == 6     # one per update, one at the end
    with progress.PlainBar(desc="prep sites", unit="site", every=1e9, file=out) as bar:
        bar.total = 100
        bar.n = 50
        bar.set_postfix(loss=0.5)
        bar.refresh()
    assert out.getvalue().splitlines()[-1].startswith("prep sites: 50/100 sites (50%)")
    assert out.getvalue().splitlines()[-1].endswith("; loss=0.5")


@pytest.mark.parametrize("mode,is_plain", [("", True), ("plain", True), ("tqdm", False)])
def test_bar_is_plain_unless_on_a_terminal(monkeypatch, mode, is_plain):
    monkeypatch.setenv("MICON_PROGRESS", mode)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    b = progress.bar(range(3), desc="d", position=1, leave=False)
    assert isinstance(b, progress.PlainBar) is is_plain
    b.close()


def test_off_silences(monkeypatch, capsys):
    monkeypatch.setenv("MICON_PROGRESS", "off")
    list(progress.bar(range(3), desc="quiet"))
    assert "quiet" not in capsys.readouterr().err
