from __future__ import annotations

from aos_plumbing.runner import configure_logging, run
from aos_tracer.service import TracerService
from aos_tracer.settings import TracerSettings


def main() -> None:
    settings = TracerSettings()
    configure_logging(settings.log_level)
    run(TracerService(settings))


if __name__ == "__main__":
    main()
