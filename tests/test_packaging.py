"""A real ``pip install .`` must put the twistd plugin where twistd finds it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_the_wheel_ships_the_plugin_and_no_plugins_init(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    wheel = next(tmp_path.glob("redisp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/redisp_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names, "would shadow Twisted's own plugins"
    assert "twisted/__init__.py" not in names
    assert "redisp/tap.py" in names
