"""Command-line entry point: ``gridstream-simulator`` / ``python -m gridstream.simulator``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from gridstream.common.runtime import EXIT_INVALID_CONFIG

from .server import start
from .settings import SettingsError, SimSettings, load_sim_settings

log = logging.getLogger("gridstream.simulator")


async def serve(settings: SimSettings) -> None:
    runner, url = await start(settings)
    log.info(
        "gridstream simulator listening on %s (ws %s/stream, symbols %s, speed %s)",
        url,
        url.replace("http", "ws", 1),
        ",".join(settings.symbols),
        settings.speed,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping simulator")
        await runner.cleanup()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = load_sim_settings()
    except SettingsError as exc:
        print(f"gridstream-simulator: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID_CONFIG) from exc
    try:
        asyncio.run(serve(settings))
    except FileNotFoundError as exc:
        print(f"gridstream-simulator: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID_CONFIG) from exc


if __name__ == "__main__":
    main()
