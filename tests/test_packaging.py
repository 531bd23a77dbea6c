"""What a release ships: a wheel without tests or fixtures (under 15 MB), an sdist without the recorded fixtures, the
licence files in both, one version, and metadata without placeholders."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-d", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return out


def test_wheel_is_small_and_holds_no_tests(dist):
    (wheel,) = dist.glob("*.whl")
    assert wheel.stat().st_size < 15 * 2**20
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("tests/") or "/fixtures/" in n]
    assert any(n.endswith("licenses/LICENSE") for n in names) and any(n.endswith("licenses/NOTICE") for n in names)
    assert "segtorch/model_cards/demo/demo_pspnet_shapes.safetensors" in names  # the offline demo works installed
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: opencv-python-headless" in metadata and "Requires-Dist: opencv-python\n" not in metadata
    assert "<owner>" not in metadata and "Classifier:" in metadata and "Project-URL:" in metadata


def test_sdist_has_no_recorded_fixtures(dist):
    (sdist,) = dist.glob("*.tar.gz")
    names = tarfile.open(sdist).getnames()
    assert not [n for n in names if "/tests/fixtures/" in n]
    assert any(n.endswith("/LICENSE") for n in names) and any(n.endswith("/NOTICE") for n in names)


def test_one_version_and_the_wheel_carries_it(dist):
    import segtorch

    assert 'version = "' not in (ROOT / "pyproject.toml").read_text()  # read from segtorch/__init__.py
    from importlib.metadata import version

    assert version("segtorch") == segtorch.__version__
    (wheel,) = dist.glob("*.whl")
    assert wheel.name.startswith(f"segtorch-{segtorch.__version__}-")
