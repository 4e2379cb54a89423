"""cowdiskd's dm-thin pool monitor, inside the kernel lab: ``dd`` fills an overcommitted pool.

A 16 MiB pool (grown at 50%, at most 64 MiB: ``max_data_size``, writes to a full pool
failed after ``no_space_timeout`` = 2 s) under a real daemon; ``dd`` writes 160 MiB into one
thin volume of 192 MiB. Seen from outside (``dmsetup status`` of the pool, sampled while dd
runs): the pool grows during the write, with no operation of the store in between (the
daemon's monitor, woken by the pool's dm event). When it cannot grow any more, dd gets an
I/O error within the bound, never a hang; the daemon's log and /metrics name the pool, the
volumes writing to it and why; every other volume still reads what it held.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Iterator

import pytest

from cowdisk.store import Store
from daemonutil import Daemon
from testutil import MiB, assert_settled, host_state, make_tree, read_at, write_at

pytestmark = pytest.mark.lab

BOUND_S = 2


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A directory for sockets on a local filesystem (the lab's /tmp may be the host's 9p share)."""
    d = tempfile.mkdtemp(prefix="cdm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else "/run")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pool_line(prefix: str) -> list[str]:
    out = subprocess.run(["dmsetup", "status", prefix + ".pool"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_pool_grows_while_dd_writes_and_a_capped_pool_fails_the_writer_in_bound(tmp_path, sockdir) -> None:
    before = host_state()
    root = str(tmp_path / "s")
    opts = {"data_size": str(16 * MiB), "grow_at_pct": "50", "max_data_size": str(64 * MiB),
            "no_space_timeout": str(BOUND_S), "block_kib": "64"}
    with Store(root, backend="dm-thin", backend_options=opts) as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        keep = s.create_volume("keep", "base")
        payload = os.urandom(MiB)
        write_at(keep.link, 4 * MiB, payload)
        s.create_volume("w", "base", size=192 * MiB, grow_fs=False)
        prefix = s.dm_prefix
        template_sha = hashlib.sha256(read_at(keep.link, 0, 2 * MiB)).hexdigest()
    total0 = int(pool_line(prefix)[5].split("/")[1])
    samples: list[tuple[float, int, str]] = []  # (time, data blocks in all, mode words)
    with Daemon(root, os.path.join(sockdir, "d.sock"), backend="dm-thin") as d:
        d.start(timeout=180)  # imports over the lab's 9p share under TCG: slow on a loaded host
        w = d.client.volume("w")
        done = threading.Event()

        def sample() -> None:  # the outside witness: the pool's status while dd writes
            while not done.is_set():
                st = pool_line(prefix)
                samples.append((time.monotonic(), int(st[5].split("/")[1]), " ".join(st[6:])))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        dd = subprocess.run(["dd", "if=/dev/zero", f"of={w.device}", "bs=1M", "count=160", "oflag=direct"],
                            capture_output=True, text=True, timeout=120)
        t_end, wall_end = time.monotonic(), time.time()
        done.set()
        sampler.join()
        # growth while dd wrote: the pool's size went up between samples, no store call made
        totals = [t for _, t, _ in samples]
        assert max(totals) > total0 and max(totals) * 64 * 1024 == 64 * MiB, (total0, sorted(set(totals)))
        grown_at = next(ts for ts, t, _ in samples if t > total0)
        assert t0 < grown_at < t_end
        # capped: dd failed, within the bound after the pool ran out of space
        assert dd.returncode != 0 and ("Input/output error" in dd.stderr or "No space" in dd.stderr), dd.stderr
        assert any("out_of_data_space" in mode for _, _, mode in samples), samples[-3:]
        # the log and the metrics: which pool, which volumes, why
        recs = d.log_records(until=lambda rs: any(r.get("event") == "failing_io" for r in rs))
        ev = {r["event"]: r for r in recs if r.get("msg", "").startswith("space ")}
        assert {"grown", "full", "failing_io"} <= set(ev), [r for r in recs if "event" in r]
        fail = ev["failing_io"]
        assert fail["pool"] == prefix + ".pool" and fail["volumes"] == ["keep", "w"], fail
        assert "max_data_size" in fail["reason"], fail
        # the writer's wait: from the pool found full (the monitor's event, a moment after the
        # kernel's) to dd's error
        waited = wall_end - ev["full"]["ts"]
        msg = (f"a writer on the full pool waited {waited:.2f} s before its error (bound {BOUND_S} s; the daemon "
              f"failed writes {fail['ts'] - ev['full']['ts']:.2f} s after full); pool {total0 * 64} KiB -> "
              f"{max(totals) * 64} KiB while dd wrote; dd: {dd.stderr.strip()!r}")
        print(msg)
        assert BOUND_S <= waited < BOUND_S + 5, waited
        # the pool's table now fails writes (seen from outside), and stays so while it is full
        table = subprocess.run(["dmsetup", "table", prefix + ".pool"], capture_output=True, text=True,
                               check=True).stdout
        assert "error_if_no_space" in table, table
        metrics = d.client.metrics()
        line = next(x for x in metrics.splitlines() if x.startswith("cowdisk_space_blocked{"))
        assert 'state="failing_io"' in line and 'volumes="keep,w"' in line and f'pool="{prefix}.pool"' in line, line
        assert line.endswith(" 1.0"), line
        # every other volume still reads what it held
        assert read_at(keep.link, 4 * MiB, MiB) == payload
        assert hashlib.sha256(read_at(keep.link, 0, 2 * MiB)).hexdigest() == template_sha
        # the writer removed while the pool is full: its blocks go back
        d.client.remove_volume("w")
        assert d.stop() == 0
    with Store(root) as s:
        assert [v.id for v in s.volumes()] == ["keep"]
        assert read_at(s.volume("keep").link, 4 * MiB, MiB) == payload
        s.destroy()
    assert_settled(before)
