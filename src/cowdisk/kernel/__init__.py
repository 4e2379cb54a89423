"""Thin typed wrappers over kernel interfaces (loop, device-mapper, block, files). No policy.

=============  ==============================================================
module         owns
=============  ==============================================================
``ioc``        the ``_IOC`` encoding: every ioctl number is computed here
``libc``       the C library, loaded once, with typed prototypes
``loop``       loop devices: attach (LOOP_CONFIGURE), detach, status, sysfs view
``dm_abi``     device-mapper ABI: struct layouts, numbers, flags, pack/parse
``dm_status``  parsers of the snapshot, thin-pool and thin status lines
``dm``         device-mapper control: :class:`dm.Control`, ``/dev/dm-N`` nodes
``blk``        block devices: size, device numbers, device nodes for jails
``fs``         files: FICLONE and the reflink probe, statfs, FIEMAP, sparse copies
``mount``      mount, umount, what is mounted where, mount ids
``procfs``     who has a file open, whether a process is alive
=============  ==============================================================

Conventions every module follows: a failed kernel call raises
:class:`cowdisk.errors.KernelError` naming the operation, the object and the errno;
caller mistakes raise :class:`cowdisk.errors.InvalidArgument` before any call; each
step that changes kernel or filesystem state (an ioctl, a mount, a mknod) logs one
DEBUG record to ``logging.getLogger(__name__)`` as ``"<op> <object>: <result>"``,
with the same op and object the error would carry.  Nothing here imports the
registry, a backend or the store.  The kernel facts relied on are in
docs/reference/ (device-mapper.md, loop-and-files.md, dm-snapshot-cow-format.md).
"""
