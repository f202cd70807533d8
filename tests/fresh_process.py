"""What a fresh interpreter does: for tests of import-time behaviour (which modules an import pulls in),
which the test process itself, having imported everything already, cannot show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_python_output(script: str) -> str:
    """The stripped stdout of `script` run by a new Python in the repository root; fails the test, with
    the script's stderr, when it exits non-zero."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
