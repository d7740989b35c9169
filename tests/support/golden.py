"""The `golden` fixture: compare a run's canonical event sequence with a file in
tests/golden/, failing with a readable unified diff; `AOS_UPDATE_GOLDEN=1` rewrites the
files instead (review the diff in git before committing them).

Register it with `pytest_plugins = ["tests.support.golden"]` in a conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from aos_tracer.golden import golden_diff

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"

CompareGolden = Callable[[str, str], None]


class GoldenMismatch(AssertionError):
    """The run differs from its golden file; the message is the unified diff."""


def compare_golden(path: Path, actual: str, *, update: bool = False) -> None:
    """Raise GoldenMismatch with a diff when `actual` differs from the file at `path`."""
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        raise GoldenMismatch(
            f"no golden file {path}; record it with AOS_UPDATE_GOLDEN=1 (then review it)"
        )
    diff = golden_diff(path.read_text(), actual, f"{path.name} (golden)", f"{path.name} (run)")
    if diff:
        raise GoldenMismatch(
            f"the run differs from {path} (AOS_UPDATE_GOLDEN=1 rewrites it if the change is "
            f"intended):\n{diff}"
        )


@pytest.fixture
def golden() -> CompareGolden:
    """golden(name, text): compare `text` with tests/golden/<name>.json."""
    update = os.environ.get("AOS_UPDATE_GOLDEN") == "1"

    def compare(name: str, actual: str) -> None:
        try:
            compare_golden(GOLDEN_DIR / f"{name}.json", actual, update=update)
        except GoldenMismatch as exc:
            pytest.fail(str(exc), pytrace=False)

    return compare
