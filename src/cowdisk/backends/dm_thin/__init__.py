"""dm-thin volumes: one thin-pool per store, a thin snapshot per volume, no loop per volume.

The pool (``<dm prefix>.pool``) sits on a data and a metadata device: by default two
loops over sparse files the store manages (``<root>/thin/data.img``, ``meta.img``;
two loops whatever the number of volumes), or block devices the user names with the
store options ``data_dev`` and ``metadata_dev`` (an LVM logical volume, a partition).

* A **template** is a thin device filled once from the template file (only its data
  segments: unprovisioned blocks read as zeros) and then deactivated. Its thin id is
  kept in ``<root>/thin/templates/<template id>`` (written only once the fill is
  complete; ``.partial`` while it runs, so a killed fill is deleted and redone).
* A **volume** is ``create_snap`` of its template's thin id: no data copied. Its thin
  id is kept in ``volumes/<id>/thin`` (written and fsynced before the snapshot exists,
  so a kill at any instant leaves the id named). Checkpoint removes the dm device and
  keeps the thin; restore in place activates it again; restore as a new id and fork
  are ``create_snap`` of the source (suspended for that instant when attached).
* Thin ids come from the pool's own transaction id (``set_transaction_id t t+1``, a
  compare-and-swap the kernel commits in the pool's metadata), so they are unique
  across processes and never reused; no file or lock is needed to allocate one.
* Remove discards the whole thin device before ``delete`` (option ``discard_on_remove``,
  on by default) so the blocks it alone held go back to the pool *and*, through
  discard passdown and the loop's hole punching, to the host's filesystem
  (containerd #5691: without it, the space never comes back to the host).
* The pool grows before it fills: each create, fork and restore checks the pool's data
  and metadata use, and at ``grow_at_pct`` (80 by default) extends the file and reloads
  the pool's table (files only; named block devices are grown by their owner).
* After an unclean stop (the pool not active while its files exist: a reboot or a crash
  of the host) the metadata is checked with ``thin_check`` before the pool is made
  again, and repaired with ``thin_repair`` into a new file when the check fails.

See docs/dm-thin.md for the numbers behind the defaults and what happens when the pool
fills.

The package: ``pool.py`` (``ThinPool``: options, the pool and its thin ids, growth and the
space monitor), ``volumes.py`` (``DmThinBackend(ThinPool)``: templates and volumes as thins).
"""

from __future__ import annotations

from .pool import OPTIONS as OPTIONS, PoolUsage as PoolUsage, ThinPool as ThinPool, thin_supported as thin_supported
from .volumes import DmThinBackend as DmThinBackend
