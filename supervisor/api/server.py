"""``haul api``: the API application on uvicorn (uvloop and httptools), one process; run as
many replicas as needed behind a load balancer (they share nothing but Redis)."""

from __future__ import annotations

import logging

from actors.logs import setup_logging
from actors.redact import install_log_redaction, secrets_of
from actors.settings import Settings

log = logging.getLogger(__name__)


def run_api(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM. Without tokens the API listens on loopback only and says
    so; uvicorn's access log is off (request lines would carry watch tokens), haul logs each
    action by token name instead."""
    import uvicorn

    from supervisor.api.app import create_app

    settings.api.check_exposure()
    setup_logging(settings.log_format)
    install_log_redaction(secrets_of(settings))
    api = settings.api
    if api.open:
        log.warning("api: no HAUL_API_TOKENS set: anyone who reaches %s:%d may submit and cancel (loopback only)",
                    api.host, api.port)  # fmt: skip
    log.info("api: listening on http://%s:%d (docs at /docs)", api.host, api.port)
    uvicorn.run(
        create_app(settings), host=api.host, port=api.port, access_log=False, log_config=None,
        loop="uvloop", http="httptools", timeout_graceful_shutdown=5,
        # X-Forwarded-* are believed from HAUL_API_TRUSTED_PROXIES only (the dashboard reads
        # them itself), not from whatever uvicorn trusts by default
        proxy_headers=False,
    )  # fmt: skip
    return 0
