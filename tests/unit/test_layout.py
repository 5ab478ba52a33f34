"""
The package layout keeps its boundaries: the slave never loads the master, and
the STOMP client knows nothing about tasks.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_modules(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["taskmesh.slave", "taskmesh.slave.tap"])
def test_slave_never_loads_master(module: str) -> None:
    assert not {m for m in loaded_modules(module) if m.startswith("taskmesh.master")}


def test_stomp_client_knows_no_tasks() -> None:
    loaded = {m for m in loaded_modules("taskmesh.stomp") if m.startswith("taskmesh.")}
    assert loaded <= {m for m in loaded if m.startswith("taskmesh.stomp")}
