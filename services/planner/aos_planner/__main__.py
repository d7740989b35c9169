from __future__ import annotations

import sys

from aos_planner.service import PlannerService
from aos_planner.settings import PlannerSettings
from aos_plumbing.runner import configure_logging, run


def main() -> None:
    if sys.argv[1:2] == ["simulate"]:
        from aos_planner.simulate import main as simulate

        sys.exit(simulate(sys.argv[2:]))
    settings = PlannerSettings()
    configure_logging(settings.log_level)
    run(PlannerService(settings))


if __name__ == "__main__":
    main()
