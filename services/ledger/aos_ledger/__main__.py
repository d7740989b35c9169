from __future__ import annotations

from aos_ledger.service import LedgerService
from aos_ledger.settings import LedgerSettings
from aos_plumbing.runner import configure_logging, run


def main() -> None:
    settings = LedgerSettings()
    configure_logging(settings.log_level)
    run(LedgerService(settings))


if __name__ == "__main__":
    main()
