import shutil
import sys
from pathlib import Path

import pytest

# tests import their shared helpers (parity.py, httpserver.py) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def case_dir(tmp_path_factory) -> Path:
    """Where the inference parity cases' image files are written (once per session)."""
    return tmp_path_factory.mktemp("inference_cases")


@pytest.fixture(autouse=True)
def _free_tmp_path(request):
    """Parity and checkpoint tests write checkpoints of hundreds of MB; pytest keeps every test's tmp_path
    until the session ends, which would need tens of GB. Remove each test's folder when it is done."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


# ---- live reference cases: how many ran against the toolbox, how many were skipped and why ------------------
_LIVE = {"passed": 0, "failed": 0, "skipped": {}}


def pytest_runtest_logreport(report):
    if "reference" not in report.keywords:
        return
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        _LIVE["skipped"][reason] = _LIVE["skipped"].get(reason, 0) + 1
    elif report.when == "call":
        _LIVE["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter):
    ran = _LIVE["passed"] + _LIVE["failed"]
    skipped = sum(_LIVE["skipped"].values())
    if not ran and not skipped:
        return
    terminalreporter.write_line(f"live reference cases: {ran} ran against the toolbox ({_LIVE['failed']} failed), "
                                f"{skipped} skipped")
    for reason, count in sorted(_LIVE["skipped"].items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"  {count} x {reason}")
