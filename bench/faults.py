#!/usr/bin/env python3
"""The long run of the randomized fault harness (tests/faults/harness.py): thousands of kills.

    python3 bench/faults.py                                   # host: copy, reflink-xfs, reflink-btrfs, pool
    python3 bench/faults.py --backends copy --kills 5000 --seed 7
    python3 lab/kernel_lab.py run --timeout 3000 -- python3 bench/faults.py --backends dm-snapshot --kills 1000
    python3 bench/faults.py --lazy 2000                       # the chunk cache harness (tests/faults/lazy.py)

Per backend: random operations (create, remove, checkpoint, restore in place and as a new
id, fork, flatten, template import and remove), each SIGKILLed after a random delay drawn
from its measured duration; recovery after each, and the invariants checked (data read
back, no leaked loop, dm device, mount or file, nothing live quarantined, a second
recovery does nothing). Prints the counts: operations, kills, kills that landed
mid-operation (the child had not reported done; with an intent left behind, the outside
witness), recoveries killed, violations. A violation is counted and printed, and the run
goes on over a fresh set of volumes. Every store is destroyed and every scratch
filesystem unmounted at the end, and the host is checked for leaks (tests/testutil.py).
Exit status 1 when a violation was seen.

``--lazy ROUNDS``: the random-kill harness over a lazy template's chunk cache instead
(tests/faults/lazy.py: reads, prefetches, evictions, gc's trims and NBD reads through the
served nbdkit, SIGKILLed at random moments, nbdkit too; the cache checked whole after
each round), on a copy store; prints its counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from faults.harness import Counts, Harness, Violation  # noqa: E402
from testutil import HOST_BACKENDS, LAB_BACKENDS, backend_store, in_lab  # noqa: E402

from cowdisk.store import release_pool  # noqa: E402


def run_backend(backend: str, args: argparse.Namespace, base: str) -> Counts:
    d = tempfile.mkdtemp(prefix=f"cowdisk-test-{os.getpid()}-faults-{backend}-", dir=base)
    os.environ["COWDISK_TEST_SCOPE"] = d  # the leak witness looks at this run's files only
    h: Harness | None = None
    root = ""
    try:
        # backend_store destroys the store afterwards and checks the host is as before
        with backend_store(backend, d) as s:
            s.close()
            root = s.root
            h = Harness(s.root, backend, os.path.join(d, "work"), seed=args.seed, keep_going=True,
                        log=lambda m: print(f"  {m}", flush=True))
            try:
                h.run(args.kills, progress_every=args.progress)
            except Violation:
                pass  # the store no longer opens: counted, the run of this backend stops
    except Exception as e:  # the teardown of a wedged store: say so, release what we can
        print(f"  {backend}: teardown failed: {type(e).__name__}: {e}", flush=True)
        if h is not None:
            h.counts.violations.append(f"{backend}: teardown failed: {type(e).__name__}: {e}")
        if root and backend == "pool":
            release_pool(root)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert h is not None
    return h.counts


def run_lazy(args: argparse.Namespace, base: str) -> int:
    from faults.lazy import LazyHarness

    d = tempfile.mkdtemp(prefix=f"cowdisk-test-{os.getpid()}-faults-lazy-", dir=base)
    os.environ["COWDISK_TEST_SCOPE"] = d
    try:
        with backend_store("copy", d) as s:
            s.close()
            h = LazyHarness(s.root, os.path.join(d, "work"), seed=args.seed, keep_going=True,
                            log=lambda m: print(f"  {m}", flush=True))
            c = h.run(args.lazy, progress_every=args.progress)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(c.line())
    for v in c.violations:
        print(f"- {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(c.as_dict(), f, indent=1)
    return 1 if c.violations else 0


def main() -> int:
    default = ",".join(LAB_BACKENDS if in_lab() else HOST_BACKENDS)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=default, help=f"comma-separated (default {default})")
    p.add_argument("--kills", type=int, default=2000, help="kills per backend (default 2000)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (default: $COWDISK_FAULT_SEED, else a random one, printed)")
    p.add_argument("--progress", type=int, default=500, help="print the counts every N rounds (0: never)")
    p.add_argument("--dir", default=None, help="where the stores go (default: the temp dir)")
    p.add_argument("--json", default=None, help="write the counts to this file")
    p.add_argument("--lazy", type=int, default=0, metavar="ROUNDS",
                   help="run the chunk cache's harness (tests/faults/lazy.py) for ROUNDS rounds instead")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("run as root (loop devices, mounts)", file=sys.stderr)
        return 2
    base = args.dir or tempfile.gettempdir()
    if args.lazy:
        return run_lazy(args, base)
    results = []
    for b in args.backends.split(","):
        print(f"{b}: {args.kills} kills", flush=True)
        results.append(run_backend(b, args, base))
        print(f"  {results[-1].line()}", flush=True)
    print()
    print(f"{'backend':<14} {'ops':>7} {'done':>7} {'kills':>7} {'mid-op':>7} {'intent':>7} {'rec.kill':>8} "
          f"{'violations':>10} {'seconds':>8}  seed")
    for c in results:
        print(f"{c.backend:<14} {c.ops:>7} {c.completed:>7} {c.kills:>7} {c.mid_op:>7} {c.intents_left:>7} "
              f"{c.recoveries_killed:>8} {len(c.violations):>10} {c.seconds:>8.1f}  {c.seed}")
    print()
    print("per operation (started / killed mid-operation):")
    kinds = sorted({k for c in results for k in c.by_op})
    print(f"{'backend':<14} " + " ".join(f"{k:>15}" for k in kinds))
    for c in results:
        print(f"{c.backend:<14} " + " ".join(f"{'/'.join(map(str, c.by_op.get(k, [0, 0]))):>15}" for k in kinds))
    bad = [v for c in results for v in c.violations]
    if bad:
        print(f"\n{len(bad)} violations:")
        for v in bad:
            print(f"- {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([c.as_dict() for c in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
