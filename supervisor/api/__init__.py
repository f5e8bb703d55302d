"""``haul api``: the HTTP API (submit, read, retry, cancel, follow events) on Starlette."""
