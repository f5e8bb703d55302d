"""haul's data plane: the domain (task, store, fetch, storage, webhook) and its Dramatiq actors.

``dramatiq actors`` imports this package: it builds the broker from the ``HAUL_*`` environment
and declares the actors. That is the only thing importing it does. A bad ``HAUL_*`` value stops
the process here, with exit status 2 and a message naming the variable.
"""

import sys as _sys

from actors import broker as _broker
from actors.settings import Settings as _Settings
from actors.settings import SettingsError as _SettingsError

try:
    _broker.setup(_Settings.from_env())
except _SettingsError as _exc:
    print(f"haul: {_exc}", file=_sys.stderr)
    raise SystemExit(2) from None

from actors.claim import claim  # noqa: E402
from actors.finalize import finalize, notify, notify_failed  # noqa: E402

__all__ = ["claim", "finalize", "notify", "notify_failed"]
