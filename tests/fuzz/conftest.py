"""Print how many fuzz examples were sent, per method and in all."""

from __future__ import annotations

import sys

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    module = next((m for n, m in sys.modules.items() if n.endswith("test_grpc_fuzz")), None)
    EXAMPLES = getattr(module, "EXAMPLES", None)
    if not EXAMPLES:
        return
    terminalreporter.section("gRPC fuzz examples")
    for name, n in sorted(EXAMPLES.items()):
        terminalreporter.write_line(f"{n:6d}  {name}")
    terminalreporter.write_line(f"{sum(EXAMPLES.values()):6d}  in all")
