from __future__ import annotations

from aos_executor.service import ExecutorService
from aos_executor.settings import ExecutorSettings
from aos_plumbing.runner import configure_logging, run


def main() -> None:
    settings = ExecutorSettings()
    configure_logging(settings.log_level)
    run(ExecutorService(settings))


if __name__ == "__main__":
    main()
