"""The daemon's API fuzzed from its own OpenAPI document (schemathesis), over its unix socket.

``run_pass(sock, ...)`` fetches ``/openapi.json`` from the daemon, lets schemathesis make
requests for every operation (schema-valid ones and, with ``negative``, schema-breaking
ones), sends them through a requests session whose adapter connects to the unix socket,
and checks each answer:

* schemathesis' own checks: a status the document declares, the declared content type,
  the body matching the declared schema, and schema-breaking input refused (4xx);
* a 5xx only as the documented error document, and a 500 only as a ``KernelError``;
* no hang: every request has a deadline (``REQUEST_TIMEOUT``);
* with ``state`` (a callable returning the store's state), a refused request (4xx)
  changed nothing: the state before and after it are equal.

tests/host/test_fuzz_api.py runs passes as root and, in setuid children, as other uids (where
the store cannot be read: the parent compares the state around the whole pass).
"""

from __future__ import annotations

import collections
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.connectionpool

BASE = "http://cowdisk"
REQUEST_TIMEOUT = 60.0
"""Seconds one request may take before it counts as a hang (the longest store call the fuzzer
can cause, a template build of a small tree, takes well under a second)."""


JOB_PATIENCE = 20.0
"""Seconds the fuzzer lets a job run before it cancels it (a build of a large size the
fuzzer drew takes as long as hashing that many bytes)."""
CANCEL_BOUND = 30.0
"""Seconds a cancelled job may take to end before it counts as a hang."""


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("cowdisk", timeout=timeout)
        self.unix_path = path
        self.unix_timeout = timeout

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.unix_timeout)
        s.connect(self.unix_path)
        self.sock = s


class _UnixPool(urllib3.connectionpool.HTTPConnectionPool):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("cowdisk", timeout=timeout)
        self.unix_path = path
        self.unix_timeout = timeout

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.unix_path, self.unix_timeout)


class UnixAdapter(requests.adapters.HTTPAdapter):
    """A requests transport to one unix socket, whatever the URL's host."""

    def __init__(self, path: str, timeout: float = REQUEST_TIMEOUT) -> None:
        super().__init__()
        self._pool = _UnixPool(path, timeout)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> _UnixPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def session(sock: str) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy from the environment
    s.mount(BASE + "/", UnixAdapter(sock))
    return s


@dataclass
class Counts:
    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    by_operation: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "operations": len(self.by_operation), "failures": self.failures,
                "seconds": round(self.seconds, 1)}


def _error_type(resp: requests.Response) -> str | None:
    try:
        doc = resp.json()
        return str(doc["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return None


def run_pass(sock: str, examples: int, *, negative: bool = True, budget_s: float = 60.0,
             state: Callable[[], object] | None = None,
             expect: Callable[[requests.Response], str | None] | None = None,
             skip: Callable[[str, str], bool] | None = None,
             known: dict[str, list[Any]] | None = None, doc: dict[str, Any] | None = None) -> Counts:
    """One fuzz pass over every operation: up to ``examples`` requests each (per mode),
    each operation at least one and then within its equal share of ``budget_s``. ``expect`` may add a check of its own on each
    answer (a message when it fails); ``skip(method, path)`` leaves an operation out.

    ``known`` steers the generated requests to objects that exist: for a path parameter or
    a top-level body field of that name, the fuzzer picks one of the values (or keeps its
    own) so that operations reach the store, not only the validation. The id of every
    job a request starts is added to ``known["job_id"]``, and the pass waits for the job
    to end before the next request (its changes are not a refused request's). ``doc``: the
    OpenAPI document to use instead of the daemon's ``/openapi.json`` (a caller the daemon
    refuses cannot fetch it)."""
    import hypothesis
    import hypothesis.strategies as st
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import (content_type_conformance, negative_data_rejection,
                                     response_schema_conformance, status_code_conformance)

    s = session(sock)
    if doc is None:
        doc = s.get(f"{BASE}/openapi.json", timeout=REQUEST_TIMEOUT).json()
    schema = schemathesis.openapi.from_dict(doc)
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    counts = Counts()
    t0 = time.monotonic()
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negative else [])
    ops = []
    for result in schema.get_all_operations():
        op = result.ok()
        if skip is not None and skip(op.method.upper(), op.path):
            continue
        ops.append(op)
    share = budget_s / max(1, len(ops) * len(modes))  # each operation's time in each mode
    for mode in modes:
        for op in ops:
            op_end = time.monotonic() + share
            sent_here = [0]
            def one(case: Any, data: Any) -> None:
                name = f"{case.operation.method.upper()} {case.operation.path}"
                # every operation gets its first request whatever the host's speed (a loaded
                # host once reached 25 of 31 in a budget spent on the first ones), then its share
                if sent_here[0] and time.monotonic() > op_end:
                    return
                sent_here[0] += 1
                if mode == GenerationMode.POSITIVE:  # a negative case stays invalid
                    _steer(case, known or {}, lambda vs: data.draw(st.sampled_from([_KEEP, *vs])))
                before = state() if state is not None else None
                sent = time.monotonic()
                try:
                    resp = case.call(base_url=BASE, session=s, timeout=REQUEST_TIMEOUT)
                except requests.exceptions.Timeout:
                    counts.failures.append(f"{name}: no answer within {REQUEST_TIMEOUT} s (a hang): "
                                           f"{case.as_curl_command()}")
                    return
                except requests.exceptions.ConnectionError as e:
                    counts.failures.append(f"{name}: connection failed ({e}): {case.as_curl_command()}")
                    return
                counts.requests += 1
                counts.statuses[resp.status_code] += 1
                counts.by_operation[name] += 1
                problems = []
                try:
                    case.validate_response(resp, checks=checks)
                except (Exception, BaseExceptionGroup) as e:  # schemathesis' failure group: a line per check
                    problems.append(" ".join(str(e).split())[:600])
                if resp.status_code >= 500:
                    t = _error_type(resp)
                    if t is None:
                        problems.append(f"{resp.status_code} without the error document")
                    elif resp.status_code == 500 and t != "KernelError":
                        problems.append(f"500 {t}: {resp.text[:300]}")
                if expect is not None:
                    m = expect(resp)
                    if m:
                        problems.append(m)
                if state is not None and 400 <= resp.status_code < 500:
                    after = state()
                    if after != before:
                        problems.append(f"refused {resp.status_code} but the store changed: "
                                        f"{_diff(before, after)}")
                if resp.status_code == 202 and known is not None:
                    problems += _wait_job(s, resp, known)
                if problems:
                    counts.failures.append(f"{name} -> {resp.status_code} after {time.monotonic() - sent:.2f} s: "
                                           f"{'; '.join(problems)}; {case.as_curl_command()}")

            strategy = op.as_strategy(generation_mode=mode)
            test = hypothesis.settings(
                max_examples=examples, deadline=None, database=None, derandomize=False,
                phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck),
                verbosity=hypothesis.Verbosity.quiet)(
                hypothesis.given(case=strategy, data=st.data())(one))
            try:
                test()
            except (hypothesis.errors.Unsatisfiable, hypothesis.errors.Flaky):
                # about hypothesis's own draws (a skipped example draws nothing), not an answer:
                # every answer's problems are in counts.failures already
                pass
    counts.seconds = time.monotonic() - t0
    s.close()
    return counts


_KEEP = object()


def _steer(case: Any, known: dict[str, list[Any]], pick: Callable[[list[Any]], Any]) -> None:
    for k, v in list((case.path_parameters or {}).items()):
        if known.get(k):
            new = pick(known[k])
            if new is not _KEEP:
                case.path_parameters[k] = new
    if isinstance(case.body, dict):
        for k in list(case.body):
            if known.get(k):
                new = pick(known[k])
                if new is not _KEEP:
                    case.body[k] = new


def _wait_job(s: requests.Session, resp: requests.Response, known: dict[str, list[Any]]) -> list[str]:
    """Wait for the job a 202 started to end; problems (it did not end in time)."""
    try:
        jid = resp.json()["id"]
    except (ValueError, KeyError, TypeError):
        return [f"202 without a job id: {resp.text[:200]}"]
    known.setdefault("job_id", []).append(jid)

    def ended(within: float) -> bool:
        end = time.monotonic() + within
        while time.monotonic() < end:
            j = s.get(f"{BASE}/v1/jobs/{jid}", params={"wait": 5}, timeout=REQUEST_TIMEOUT).json()
            if j["state"] not in ("queued", "running"):
                return True
        return False

    if ended(JOB_PATIENCE):
        return []
    # a long job is no hang when asked to stop it stops (a 60 GiB build hashes 60 GiB)
    r = s.post(f"{BASE}/v1/jobs/{jid}/cancel", timeout=REQUEST_TIMEOUT)
    if r.status_code != 200:
        return [f"job {jid}: still running after {JOB_PATIENCE} s, and cancel answered {r.status_code}: {r.text[:200]}"]
    if ended(CANCEL_BOUND):
        return []
    return [f"job {jid}: still running {CANCEL_BOUND} s after its cancel, {JOB_PATIENCE} s after it began (a hang)"]


def _diff(before: object, after: object) -> str:
    """What differs between two states (dicts of lists): per key, the items added and gone."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for k in sorted(set(before) | set(after)):
            b, a = before.get(k), after.get(k)
            if b == a:
                continue
            if isinstance(b, list) and isinstance(a, list):
                out.append(f"{k}: +{[x for x in a if x not in b]!r:.300} -{[x for x in b if x not in a]!r:.300}")
            else:
                out.append(f"{k}: {b!r:.200} -> {a!r:.200}")
        return "; ".join(out)
    return f"{before!r:.300} -> {after!r:.300}"


def forbidden(resp: requests.Response) -> str | None:
    """The check of a pass as a caller the daemon must refuse: 403 with a Forbidden document."""
    if resp.status_code == 403 and _error_type(resp) == "Forbidden":
        return None
    return f"expected 403 Forbidden, got {resp.status_code} {resp.text[:200]}"
