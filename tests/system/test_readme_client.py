"""The README's raw-client snippet, run as a user would: only nats-py, the URL from
AOS_NATS_URL, a goal of the schema's fields, and an answer at the end."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.conftest import System

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_client(namespace: str) -> str:
    """The snippet under "Publishing a goal from your own program", on `namespace`'s
    subjects instead of the default `aos` (tests share one NATS)."""
    section = README.read_text().split("## Publishing a goal from your own program", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README lost its raw-client snippet"
    code = match.group(1).replace('f"aos.', f'f"{namespace}.')
    ast.parse(code)  # what the README shows is valid Python
    return code


def test_the_readme_snippet_gets_its_run_to_an_end(system: System, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(readme_client(system.namespace))
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "AOS_NATS_URL": system.nats_url},
        cwd=tmp_path,  # no .aos/state.json here: the URL comes from the environment
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert "'type': 'run.completed'" in done.stdout, done.stdout
