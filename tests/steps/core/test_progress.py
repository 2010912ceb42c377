"""steps/core/progress.py: bars on a terminal only, unless forced."""

from __future__ import annotations

from steps.core.progress import interactive, progress


def test_bars_show_on_a_terminal_only_unless_forced(monkeypatch):
    monkeypatch.delenv("TUNELINE_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert not interactive() and progress(range(3)).disable
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert interactive() and not progress(range(3)).disable
    assert progress(range(3), disable=True).disable  # a caller's own switch (e.g. not rank 0) still wins
    monkeypatch.setenv("TUNELINE_PROGRESS", "0")
    assert not interactive()
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    monkeypatch.setenv("TUNELINE_PROGRESS", "1")
    assert interactive() and list(progress(range(3))) == [0, 1, 2]
