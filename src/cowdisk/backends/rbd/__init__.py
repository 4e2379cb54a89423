"""``rbd``: volumes as layered Ceph RBD images, through librbd (the ``rbd`` Python module).

A template is an RBD image ``cowdisk-t-<template id>`` written sparsely from the
template file, with a protected snapshot ``cowdisk-<template id>`` (the id is the first
16 hex digits of the template's sha256). A volume is a clone ``cowdisk-v-<volume id>``
of that snapshot: no data is copied. Fork and restore under a new id snapshot the
source image (``cowdisk-for-<new id>``, protected; a fork into N: one snapshot, named for
the first child, cloned N times) and clone that. Removing a volume
deletes its clone, then unprotects and removes the snapshot it was cloned from once no
other clone uses it (the template's image too). Flatten reads the image (with its
parents) into a new local template file.

Every image lives in the store's pool and RADOS namespace (options below). Images are
named by template digest and volume id, not by store, so that stores on several hosts
sharing a namespace share the templates (imported once into the cluster) and can hand a
checkpointed volume to one another. Two records in each volume image's metadata say which store may do what
(both ``<store tag>@<host>``): the *owner* (``cowdisk.owner``: the store whose registry
governs the volume; set when it is made, moved by :meth:`RbdBackend.claim` when another
store adopts it) and the *holder* (``cowdisk.holder``: the store that has it attached;
set on attach, cleared on detach). Attaching an image another store owns or holds is
refused (InUse naming that store, its host and whether a client of it is still alive);
removing one only forgets it here. :meth:`RbdBackend.take_over` is the explicit fencing
step for a host that died: it blocklists every client watching the image (``osd
blocklist add``: they can no longer write, even if that host comes back), breaks their
exclusive lock and clears the hold. A volume image also records its template's id
(``cowdisk.template``) and a template image its full digest (``cowdisk.digest``), so a
store that never saw the template's file can adopt the volume.

What the device path (and the store's stable link) is, by the ``map`` option:

* ``fuse`` (default): the image is exported as a regular file
  ``volumes/<id>/disk.img`` by a ``qemu-storage-daemon`` (QEMU's own rbd driver and its
  FUSE export, one daemon per attached volume, started detached so it outlives
  cowdisk like a kernel object). Every VMM opens it as a raw file; no kernel module.
* ``none``: nothing is mapped; the device path is QEMU's rbd filename
  ``rbd:<pool>/[<namespace>/]<image>:id=<client>:conf=<conf>``, and the stable link is a
  symlink whose *target text* is that string (it does not resolve: ``readlink`` it).
  For QEMU, which opens RBD itself (``cowdisk volume drive --format qemu``). Fastest.

Options (``Store(root, backend="rbd", backend_options={...})``, recorded with the store):
``conf`` (ceph.conf path, required; put ``keyring`` there for cephx), ``pool``
(required), ``client`` (the client id, default ``admin``), ``namespace`` (RADOS
namespace, default the pool's default one; created on open), ``map`` (``fuse`` or
``none``).

The package: ``lib.py`` (loading librados and librbd, errors named, connecting),
``records.py`` (image names, the owner and holder records, fencing, volumes other stores
made), ``export.py`` (the qemu-storage-daemon FUSE export), ``backend.py``
(:class:`RbdBackend`).
"""

from __future__ import annotations

from .backend import MAPS as MAPS, OPTIONS as OPTIONS, RbdBackend as RbdBackend
from .export import DISK as DISK, PIDFILE as PIDFILE, QSD as QSD
from .lib import librbd as librbd, named as named
from .records import (
    DIGEST as DIGEST,
    HOLDER as HOLDER,
    OWNER as OWNER,
    PARENT_KEY as PARENT_KEY,
    TEMPLATE_KEY as TEMPLATE_KEY,
    copy_snap as copy_snap,
    template_image as template_image,
    template_snap as template_snap,
    volume_image as volume_image,
)
