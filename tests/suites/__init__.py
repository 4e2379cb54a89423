"""The store suites, one module per capability, run on every backend.

Each ``test_*`` function here takes the ``store`` fixture (a fresh store, destroyed
afterwards with the host left exactly as before) and, where the check differs between
block and file backends, ``backend``. tests/host/test_<capability>.py runs a module on
copy, reflink (xfs, btrfs) and pool; tests/lab/test_<capability>_dm.py on dm-snapshot
in the kernel lab. Both import the functions, so the two tiers run the same checks.

conformance  volume lifecycle, restore under a new id, fork, flatten, usage, bad ids
concurrency  processes with their own Store objects and threads sharing one
data         an ext4 written through a mounted volume across checkpoint and restore
bad_input    invalid ids, a missing template, a template changed on disk
failures     the world under the store: a full filesystem, a holder keeping the volume
             open, immutable link directories, checkpoint data gone
jail         staging a volume into a jail: device node or hard link, stale entries
"""
