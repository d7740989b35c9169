"""The alert rules and the Alertmanager configuration, checked by their own tools."""

from __future__ import annotations

from tests.infra.tools import INFRA, run_tool, tool

RULES = INFRA / "prometheus" / "rules" / "aos.rules.yml"
RULE_TESTS = INFRA / "prometheus" / "tests" / "aos.rules.test.yml"
ALERTMANAGER = INFRA / "alertmanager" / "alertmanager.yml"


def test_alert_rules_are_valid() -> None:
    out = run_tool(tool("promtool"), "check", "rules", str(RULES))
    assert "SUCCESS" in out.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    # Every alert fires on the series that should raise it and stays quiet on the others.
    out = run_tool(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_unit_test() -> None:
    rules = RULES.read_text()
    tested = RULE_TESTS.read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert alerts
    untested = [name for name in alerts if f"alertname: {name}" not in tested]
    assert not untested, f"alerts without a promtool test: {untested}"


def test_alertmanager_configuration_is_valid() -> None:
    out = run_tool(tool("amtool"), "check-config", str(ALERTMANAGER))
    assert "SUCCESS" in out.stdout
