import shutil
import sys
from pathlib import Path

import pytest

# tests import their shared helpers (parity.py, httpserver.py) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _free_tmp_path(request):
    """Parity and checkpoint tests write checkpoints of hundreds of MB; pytest keeps every test's tmp_path
    until the session ends, which would need tens of GB. Remove each test's folder when it is done."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
