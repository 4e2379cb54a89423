"""cowdiskd: the store as a local service, HTTP/1.1 + JSON on a unix socket.

The daemon is one more caller of :class:`cowdisk.store.Store` (caller -> store ->
backend -> kernel), never a second store: the per-volume and per-template file locks
stay the truth, so the command line and the library keep working on the same store
beside it. Modules:

===============  ===================================================================
config.py        the one TOML file, the same settings as flags and environment
protocol.py      the error document (the CLI's ``--json`` one), HTTP statuses, the
                 API's paths; shared with :mod:`cowdisk.client` (no web framework)
security.py      SO_PEERCRED, the uid/gid allowlist, paths a request may name
jobs.py          long operations as jobs: progress, wait, cancel
metrics.py       Prometheus text at ``/metrics``
api.py           the FastAPI application: one endpoint per Store operation
calls.py         what the endpoints ask of the store, as functions a store worker runs
workers.py       the store worker processes: fork, call, a dead worker's recovery
logs.py          the JSON (or text) log lines, for the daemon and its workers
server.py        the life cycle: single instance, recover, listen, READY=1, SIGTERM
===============  ===================================================================

Only :mod:`.protocol`, :mod:`.config`, :mod:`.calls`, :mod:`.logs` and :mod:`.workers`
are light to import (a store worker started afresh needs no web framework); the rest
needs the ``daemon`` dependencies (FastAPI, uvicorn, prometheus-client).
"""
