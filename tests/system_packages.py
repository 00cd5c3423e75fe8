"""Tests that need a system package skip with the reason `missing(...)` gives, so that the session's
last line (conftest.py) can count them and name the command that installs them all (the Makefile's
setup-system target)."""

from __future__ import annotations

SETUP_COMMAND = "sudo make setup-system"
_MARK = "missing system package "


def missing(package: str, need: str) -> str:
    """The skip reason of a test that cannot run without `package`; `need`: what the test uses it for."""
    return f"{_MARK}{package}: {need} (`{SETUP_COMMAND}` installs it)"


def summary(reasons: list[str]) -> str | None:
    """The session's closing line when some of these skip reasons are `missing(...)`'s, else None."""
    ours = [r.split(_MARK, 1)[1] for r in reasons if _MARK in r]
    if not ours:
        return None
    packages = sorted({r.split(":", 1)[0] for r in ours})
    return (f"{len(ours)} test{'s' * (len(ours) > 1)} skipped for missing system packages "
            f"({', '.join(packages)}): run `{SETUP_COMMAND}`")


def report(terminalreporter) -> None:
    """Write summary() of the session's skips; `terminalreporter`: pytest's, None without a terminal."""
    if terminalreporter is None:
        return
    reasons = [rep.longrepr[2] for rep in terminalreporter.stats.get("skipped", [])
               if isinstance(rep.longrepr, tuple)]
    line = summary(reasons)
    if line:
        terminalreporter.write_line(line, yellow=True, bold=True)
