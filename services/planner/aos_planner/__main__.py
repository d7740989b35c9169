from __future__ import annotations

from aos_planner.service import PlannerService
from aos_planner.settings import PlannerSettings
from aos_plumbing.runner import configure_logging, run


def main() -> None:
    settings = PlannerSettings()
    configure_logging(settings.log_level)
    run(PlannerService(settings))


if __name__ == "__main__":
    main()
