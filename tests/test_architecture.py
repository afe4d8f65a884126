"""The layers are checked, not hoped for: the contracts in pyproject.toml ([tool.importlinter]) hold.

beacons/ and devices/ are pure leaves; the core never imports the API, the simulators or the entry
points; the API never imports the entry points; data flows one way through the core's stages; no
two sibling packages import each other. A new wrong-way import or cycle fails here, naming it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
