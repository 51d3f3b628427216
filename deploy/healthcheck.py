"""Container health check (Docker HEALTHCHECK): exit 0 when the service answers, else 1.

Standard library only (the slim image has no curl). The URL is, in order:
``GS_HEALTHCHECK_URL``; for the simulator ``/api/v3/ping`` on ``GS_SIM_PORT`` (default 8900);
for every other service ``/healthz`` on ``GS_METRICS_PORT`` (default 9100). The ``cli`` image
runs one-shot commands and has no server, so it is always reported healthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def health_url(env: dict[str, str]) -> str | None:
    """The URL to probe for this container, or None when there is nothing to probe."""
    if env.get("GS_HEALTHCHECK_URL"):
        return env["GS_HEALTHCHECK_URL"]
    service = env.get("SERVICE", "")
    if service == "cli":
        return None
    if service == "simulator":
        return f"http://127.0.0.1:{env.get('GS_SIM_PORT') or '8900'}/api/v3/ping"
    return f"http://127.0.0.1:{env.get('GS_METRICS_PORT') or '9100'}/healthz"


def main() -> int:
    url = health_url(dict(os.environ))
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 0 if 200 <= resp.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
