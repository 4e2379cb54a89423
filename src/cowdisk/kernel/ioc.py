"""Linux ioctl request numbers: the ``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros of
``include/uapi/asm-generic/ioctl.h``.

A request number packs a direction, a size, a type byte and a number::

    dir << DIRSHIFT | size << SIZESHIFT | type << TYPESHIFT | nr << NRSHIFT

``dir`` says what the kernel does with the argument buffer (``WRITE``: it reads from
user space; ``READ``: it writes to user space).  Every kernel module of cowdisk
computes its numbers here, from the size of the :class:`struct.Struct` it passes, so a
number and its layout cannot drift apart.  Numbers the kernel defines as plain
constants (``LOOP_SET_FD 0x4C00``) equal :func:`IO` of their type and number.

Most architectures (x86, arm, arm64, riscv, s390) use the generic layout; powerpc,
mips, sparc and alpha use 13 size bits and 3 direction bits with other direction
values.  An architecture this module does not know raises at import rather than
compute wrong numbers.
"""

from __future__ import annotations

import platform
import struct

_GENERIC = (14, 2, 0, 1, 2)  # size bits, dir bits, NONE, WRITE, READ
_OTHER = (13, 3, 1, 4, 2)
_ARCH = {
    "x86_64": _GENERIC, "i386": _GENERIC, "i486": _GENERIC, "i586": _GENERIC, "i686": _GENERIC,
    "aarch64": _GENERIC, "arm64": _GENERIC, "s390x": _GENERIC,
    "riscv64": _GENERIC, "loongarch64": _GENERIC,
    "ppc": _OTHER, "ppc64": _OTHER, "ppc64le": _OTHER, "mips": _OTHER, "mips64": _OTHER,
    "sparc": _OTHER, "sparc64": _OTHER, "alpha": _OTHER,
}


def _layout(machine: str) -> tuple[int, int, int, int, int]:
    if machine in _ARCH:
        return _ARCH[machine]
    if machine.startswith("arm"):
        return _GENERIC
    raise ImportError(f"cowdisk.kernel.ioc: unknown ioctl layout for machine {machine!r}")


SIZEBITS, DIRBITS, NONE, WRITE, READ = _layout(platform.machine())
NRBITS = 8
TYPEBITS = 8
NRSHIFT = 0
TYPESHIFT = NRSHIFT + NRBITS
SIZESHIFT = TYPESHIFT + TYPEBITS
DIRSHIFT = SIZESHIFT + SIZEBITS


def IOC(direction: int, type: int, nr: int, size: int | struct.Struct) -> int:  # noqa: N802 (the kernel's name)
    """``_IOC(dir, type, nr, size)``; ``size`` may be a Struct (its ``.size`` is used)."""
    n = size.size if isinstance(size, struct.Struct) else size
    if not 0 <= type < 1 << TYPEBITS or not 0 <= nr < 1 << NRBITS or not 0 <= n < 1 << SIZEBITS:
        raise ValueError(f"ioctl field out of range: type={type:#x} nr={nr:#x} size={n}")
    return (direction << DIRSHIFT) | (n << SIZESHIFT) | (type << TYPESHIFT) | (nr << NRSHIFT)


def IO(type: int, nr: int) -> int:  # noqa: N802
    """``_IO(type, nr)``: no argument buffer."""
    return IOC(NONE, type, nr, 0)


def IOR(type: int, nr: int, size: int | struct.Struct) -> int:  # noqa: N802
    """``_IOR(type, nr, T)``: the kernel writes ``size`` bytes back to the caller."""
    return IOC(READ, type, nr, size)


def IOW(type: int, nr: int, size: int | struct.Struct) -> int:  # noqa: N802
    """``_IOW(type, nr, T)``: the kernel reads ``size`` bytes from the caller."""
    return IOC(WRITE, type, nr, size)


def IOWR(type: int, nr: int, size: int | struct.Struct) -> int:  # noqa: N802
    """``_IOWR(type, nr, T)``: both directions."""
    return IOC(READ | WRITE, type, nr, size)


__all__ = ["IO", "IOC", "IOR", "IOW", "IOWR", "NONE", "READ", "WRITE"]
