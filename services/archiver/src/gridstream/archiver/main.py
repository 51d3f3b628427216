"""``python -m gridstream.archiver``: candles and fills -> Parquet under ``GS_ARCHIVE_DIR``."""

from __future__ import annotations

from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.streams import Service, group

from .service import Archiver
from .settings import ArchiverSettings
from .store import LocalStore


async def amain() -> None:
    settings = load_or_exit(ArchiverSettings)
    rt = Runtime(Service.ARCHIVER, settings)
    try:
        await rt.start(database=False)
        if not await rt.become_active():
            return
        archiver = Archiver.from_settings(
            rt.redis,
            LocalStore(settings.archive_dir),
            settings,
            group=group(Service.ARCHIVER),
            consumer=rt.consumer_name,
        )
        if rt.active is not None:
            active = rt.active
            archiver.consumer.fence = lambda _stream: active.fence()
        await archiver.ensure_groups()
        rt.ready = True
        rt.status["archive_dir"] = settings.archive_dir
        await archiver.run(rt.stop_event)
    finally:
        await rt.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
