"""``tools/bad_inputs.py`` in CI: issue 16's red-team cases through the real command line.

The tool runs every case of its ``red-team`` group (in this process where that is the same
thing, in a second process where it is not: the run-folder lock) and counts tracebacks,
silent results (exit 0 or no message where an error was expected, or an output check that
failed: the merged model of a default run must reproduce the masked one to 1e-6, k-NN on
copies of the training images must be perfect) and lost files (a protected file changed,
replaced or deleted). All three must be 0. About 10 s of CPU.
"""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bad_inputs.py"


def _tool():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bad_inputs", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_red_team_cases_report_no_traceback_no_silent_result_no_lost_file() -> None:
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    led = _tool().run_groups(["red-team"])
    assert len(led.rows) >= 40
    assert (led.tracebacks, led.silent, led.lost) == ([], [], []), led.summary()
    assert led.summary() == "0 tracebacks, 0 silent results, 0 lost files"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (sigint, sigterm)


def test_the_ledger_counts_what_it_must() -> None:
    """The counters themselves can fail: a traceback, a silent exit 0, a changed protected file."""
    tool = _tool()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        led = tool.Ledger(Path(tmp))
        kept = Path(tmp) / "kept.txt"
        kept.write_text("mine")
        led.run("t", "traceback", (1, "Traceback (most recent call last):\n  ...\nKeyError: 'x'"))
        led.run("t", "silent", (0, ""))
        led.run("t", "error without a message", (2, ""))
        led.run("t", "lost", lambda: (kept.write_text("changed"), (2, "selfmask adapt: error: x"))[1], protect=(kept,))
        led.run("t", "check", (0, ""), expect=0, check=lambda _c, _e: "wrong output")
        led.run("t", "fine", (2, "selfmask adapt: error: a clear line"))
        assert led.summary() == "1 tracebacks, 3 silent results, 1 lost files"
