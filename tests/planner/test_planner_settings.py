"""The planner's settings: what a misconfiguration says at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aos_planner.settings import PlannerSettings


def test_skill_roles_are_read_as_json_and_must_name_known_skills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AOS_SKILL_ROLES", '{"http_call": "skill:http"}')
    assert PlannerSettings().skill_roles == {"http_call": "skill:http"}
    monkeypatch.setenv("AOS_SKILL_ROLES", '{"teleport": "skill:magic"}')
    with pytest.raises(ValidationError, match=r"unknown skills \['teleport'\]"):
        PlannerSettings()
