"""The house rules, checked: services share only contracts and plumbing."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["planner", "executor", "ledger", "tracer"]
PACKAGES = {
    "aos_contracts": ROOT / "contracts" / "aos_contracts",
    "aos_plumbing": ROOT / "services" / "plumbing" / "aos_plumbing",
    "aos_cli": ROOT / "cli" / "aos_cli",
    **{f"aos_{name}": ROOT / "services" / name / f"aos_{name}" for name in SERVICES},
}
ALLOWED = {
    "aos_contracts": set(),
    "aos_plumbing": {"aos_contracts"},
    "aos_cli": {"aos_contracts", "aos_plumbing"},
    **{f"aos_{name}": {"aos_contracts", "aos_plumbing"} for name in SERVICES},
}


def aos_imports(package_dir: Path) -> set[str]:
    found: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            found.update(name.split(".")[0] for name in names if name.startswith("aos_"))
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_imports_only_what_the_house_allows(package: str) -> None:
    imported = aos_imports(PACKAGES[package]) - {package}
    assert imported <= ALLOWED[package], f"{package} imports {sorted(imported - ALLOWED[package])}"


def test_contracts_need_nothing_but_pydantic() -> None:
    third_party: set[str] = set()
    for path in PACKAGES["aos_contracts"].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                third_party.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                third_party.update(alias.name.split(".")[0] for alias in node.names)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert third_party - stdlib - {"aos_contracts"} == {"pydantic"}
