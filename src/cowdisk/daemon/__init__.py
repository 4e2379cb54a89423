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
server.py        the life cycle: single instance, recover, listen, READY=1, SIGTERM
===============  ===================================================================

Only :mod:`.protocol` and :mod:`.config` are light to import; the rest needs the
``daemon`` dependencies (FastAPI, uvicorn, prometheus-client).
"""
