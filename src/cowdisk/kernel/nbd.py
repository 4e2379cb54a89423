"""NBD block devices (``/dev/nbdN``) connected to a server's unix socket, through the
kernel's generic netlink family ``nbd`` (include/uapi/linux/nbd-netlink.h), no nbd-client.

* The client does the handshake itself (fixed newstyle, ``NBD_OPT_GO`` of the default
  export): the kernel takes a socket already in the transmission phase, with the
  export's size and transmission flags (``NBD_FLAG_READ_ONLY`` makes the disk read-only).
* ``NBD_CMD_CONNECT`` takes the socket's fd (looked up in the sending process), the
  size, a backend identifier (``NBD_ATTR_BACKEND_IDENTIFIER``, 6.1 has it: shown in
  ``/sys/block/nbdN/backend`` while connected) and client flags.
  ``NBD_CFLAG_DISCONNECT_ON_CLOSE`` makes the kernel disconnect the device at the last
  close of its last opener (ours, or the dm table's that uses it): like a loop's
  autoclear, a kill never leaves a device connected once nothing opens it. A device
  connected but never opened stays connected: :func:`devices` finds it by its backend.
* ``NBD_CMD_RECONFIGURE`` with a new socket replaces a dead connection (the server was
  restarted); with none dead it changes nothing. A request sent while every connection
  is dead waits ``dead_conn_timeout`` seconds for one, then fails (EIO).
* No request timeout is set: a slow read is bounded by the server (the lazy template's
  fetch bound, then EIO), never by the kernel closing the socket.

Facts from drivers/block/nbd.c (v6.1): connect with index -1 takes the first device
with no configuration (``nbds_max`` are made at module load) or adds one; an ioctl
other than DISCONNECT/CLEAR_SOCK on a netlink-made device is refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Iterator

from ..errors import KernelError

log = logging.getLogger(__name__)

NBD_MAJOR = 43
SYS_BLOCK = "/sys/block"

# --- the NBD protocol's handshake (fixed newstyle) ------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO = 7
REP_ACK, REP_INFO = 1, 3
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# --- generic netlink ------------------------------------------------------------------
NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")

FAMILY = "nbd"
GENL_VERSION = 1
CMD_CONNECT, CMD_DISCONNECT, CMD_RECONFIGURE = 1, 2, 3
ATTR_INDEX, ATTR_SIZE_BYTES, ATTR_BLOCK_SIZE_BYTES, ATTR_TIMEOUT = 1, 2, 3, 4
ATTR_SERVER_FLAGS, ATTR_CLIENT_FLAGS, ATTR_SOCKETS, ATTR_DEAD_CONN_TIMEOUT = 5, 6, 7, 8
ATTR_BACKEND_IDENTIFIER = 10
SOCK_ITEM, SOCK_FD = 1, 1
CFLAG_DISCONNECT_ON_CLOSE = 1 << 1


@dataclass(frozen=True)
class Export:
    """What the server said about its export at the end of the handshake."""

    size: int
    flags: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & NBD_FLAG_READ_ONLY)


@dataclass(frozen=True)
class NbdDevice:
    """One ``/dev/nbdN`` as sysfs shows it."""

    index: int
    backend: str
    """The backend identifier it was connected with ("" when none or not connected)."""
    connected: bool
    size: int
    holders: tuple[str, ...]
    """Devices whose tables hold it open (``/sys/block/nbdN/holders``: dm-N)."""

    @property
    def path(self) -> str:
        return f"/dev/nbd{self.index}"

    @property
    def devno(self) -> str:
        """``major:minor`` (the minor depends on the module's ``max_part``: read from sysfs)."""
        return _sys_devno(self.index)


def _sys_devno(index: int) -> str:
    try:
        with open(f"{SYS_BLOCK}/nbd{index}/dev") as f:
            return f.read().strip()
    except FileNotFoundError:
        raise KernelError("find nbd device", f"nbd{index}", errno.ENODEV) from None


def available() -> tuple[bool, str]:
    """Whether this kernel has nbd devices (the module loaded)."""
    if os.path.isdir("/sys/module/nbd"):
        return True, "the nbd module is loaded"
    return False, "the nbd module is not loaded (modprobe nbd)"


# --- the handshake --------------------------------------------------------------------

def _recv(sock: socket.socket, n: int, what: str, path: str) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise KernelError("nbd handshake", path, errno.ECONNRESET, detail=f"the server closed the connection "
                              f"while sending {what}")
        buf += part
    return buf


def handshake(sock: socket.socket, path: str, export: str = "") -> Export:
    """Negotiate export ``export`` on the connected ``sock`` (fixed newstyle, NBD_OPT_GO):
    the socket is then in the transmission phase, ready for the kernel."""
    magic, opt = struct.unpack(">QQ", _recv(sock, 16, "its greeting", path))
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise KernelError("nbd handshake", path, errno.EPROTO, detail="not a newstyle NBD server")
    (hflags,) = struct.unpack(">H", _recv(sock, 2, "its handshake flags", path))
    if not hflags & FLAG_FIXED_NEWSTYLE:
        raise KernelError("nbd handshake", path, errno.EPROTO, detail="the server is not fixed-newstyle")
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    found: Export | None = None
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", _recv(sock, 20, "an option reply", path))
        if magic != REPLY_MAGIC:
            raise KernelError("nbd handshake", path, errno.EPROTO, detail=f"bad option reply magic {magic:#x}")
        body = _recv(sock, length, "an option reply", path) if length else b""
        if rtype & REP_ERROR_BIT:
            raise KernelError("nbd handshake", path, errno.EIO, detail=f"export {export!r} refused (reply "
                              f"{rtype:#x}): {body.decode(errors='replace')}")
        if rtype == REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == INFO_EXPORT:
            size, flags = struct.unpack(">QH", body[2:12])
            found = Export(size, flags)
        elif rtype == REP_ACK:
            if found is None:
                raise KernelError("nbd handshake", path, errno.EPROTO, detail="no export size in the server's reply")
            return found


def open_export(path: str, timeout: float = 30.0) -> tuple[socket.socket, Export]:
    """A socket connected to the NBD server on unix socket ``path``, handshake done."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise KernelError("connect to nbd server", path, e.errno or errno.EIO) from None
        ex = handshake(sock, path)
        sock.settimeout(None)
        return sock, ex
    except BaseException:
        sock.close()
        raise


# --- generic netlink ------------------------------------------------------------------

def _attr(kind: int, payload: bytes) -> bytes:
    raw = NLATTR.pack(NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _u32(kind: int, v: int) -> bytes:
    return _attr(kind, struct.pack("=I", v))


def _u64(kind: int, v: int) -> bytes:
    return _attr(kind, struct.pack("=Q", v))


def _parse_attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, off)
        if length < NLATTR.size:
            break
        out[kind & 0x3FFF] = data[off + NLATTR.size:off + length]
        off += (length + 3) & ~3
    return out


class _Genl:
    """One generic netlink socket, one request at a time."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        except OSError as e:
            raise KernelError("open generic netlink", "nbd", e.errno or errno.EIO) from None
        self.sock.bind((0, 0))
        self.seq = int(time.time()) & 0xFFFF

    def close(self) -> None:
        self.sock.close()

    def request(self, family: int, cmd: int, attrs: bytes, op: str, obj: str) -> dict[int, bytes]:
        """Send one request; the attributes of its reply (empty for a plain ACK)."""
        self.seq += 1
        body = GENLMSGHDR.pack(cmd, GENL_VERSION, 0) + attrs
        self.sock.sendall(NLMSGHDR.pack(NLMSGHDR.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK, self.seq, 0)
                          + body)
        reply: dict[int, bytes] = {}
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
                if length < NLMSGHDR.size:
                    break
                payload = data[off + NLMSGHDR.size:off + length]
                off += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", payload)
                    if err:
                        raise KernelError(op, obj, -err, detail="see the kernel log (dmesg) for nbd's reason")
                    return reply
                reply.update(_parse_attrs(payload[GENLMSGHDR.size:]))

    def family(self, name: str) -> int:
        attrs = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"),
                             "find netlink family", name)
        if CTRL_ATTR_FAMILY_ID not in attrs:
            raise KernelError("find netlink family", name, errno.ENOENT)
        return int(struct.unpack_from("=H", attrs[CTRL_ATTR_FAMILY_ID])[0])


@contextlib.contextmanager
def _nbd_family() -> Iterator[tuple[_Genl, int]]:
    g = _Genl()
    try:
        try:
            fam = g.family(FAMILY)
        except KernelError as e:
            if e.errno == errno.ENOENT:
                raise KernelError("find nbd", FAMILY, errno.ENODEV, detail="the nbd module is not loaded",
                                  hint="modprobe nbd") from None
            raise
        yield g, fam
    finally:
        g.close()


def connect(server: str, backend: str, *, dead_conn_timeout: int = 30) -> NbdDevice:
    """Connect a free ``/dev/nbdN`` to the NBD server on unix socket ``server``, named
    ``backend`` (sysfs ``backend``) and disconnected by the kernel at the last close of its
    last opener. Returns the device (the caller opens it at once: until then nothing
    disconnects it)."""
    sock, ex = open_export(server)
    try:
        socks = _attr(ATTR_SOCKETS, _attr(SOCK_ITEM, _u32(SOCK_FD, sock.fileno())))
        attrs = (_u64(ATTR_SIZE_BYTES, ex.size) + _u64(ATTR_BLOCK_SIZE_BYTES, 512)
                 + _u64(ATTR_SERVER_FLAGS, ex.flags) + _u64(ATTR_CLIENT_FLAGS, CFLAG_DISCONNECT_ON_CLOSE)
                 + _u64(ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout) + socks
                 + _attr(ATTR_BACKEND_IDENTIFIER, backend.encode() + b"\0"))
        with _nbd_family() as (g, fam):
            reply = g.request(fam, CMD_CONNECT, attrs, "connect nbd device", server)
    finally:
        sock.close()  # the kernel holds its own reference to the socket
    if ATTR_INDEX not in reply:
        raise KernelError("connect nbd device", server, errno.EPROTO, detail="the kernel named no device")
    index = int(struct.unpack_from("=I", reply[ATTR_INDEX])[0])
    log.debug("nbd%d connected to %s as %r (%d bytes, flags %#x)", index, server, backend, ex.size, ex.flags)
    return device(index)


def reconnect(index: int, server: str, backend: str) -> None:
    """Give ``/dev/nbd<index>`` a new connection to ``server`` in place of a dead one (the
    server was restarted); a device whose connection lives is left as it is."""
    sock, _ = open_export(server)
    try:
        attrs = (_u32(ATTR_INDEX, index) + _attr(ATTR_SOCKETS, _attr(SOCK_ITEM, _u32(SOCK_FD, sock.fileno())))
                 + _attr(ATTR_BACKEND_IDENTIFIER, backend.encode() + b"\0"))
        with _nbd_family() as (g, fam):
            g.request(fam, CMD_RECONFIGURE, attrs, "reconnect nbd device", f"nbd{index}")
    finally:
        sock.close()


def disconnect(index: int) -> None:
    """Disconnect ``/dev/nbd<index>`` (its openers then get EIO)."""
    with _nbd_family() as (g, fam):
        g.request(fam, CMD_DISCONNECT, _u32(ATTR_INDEX, index), "disconnect nbd device", f"nbd{index}")
    log.debug("nbd%d disconnected", index)


# --- which server a device is connected to -------------------------------------------
# A note beside the server's socket (``<socket>.nbd<N>``, on the tmpfs the socket is on: gone
# with the devices at a reboot) holds the socket's inode when /dev/nbd<N> was connected to
# it; a server started again makes its socket anew, so a different inode means the device's
# connection is to a server that is gone.

def _note_path(sock: str, index: int) -> str:
    return f"{sock}.nbd{index}"


def noted(sock: str) -> tuple[int, ...]:
    """The devices noted as connected to the server on ``sock``, now or before it restarted."""
    import glob

    out = []
    for p in glob.glob(glob.escape(sock) + ".nbd*"):
        tail = p[len(sock) + 4:]
        if tail.isdigit():
            out.append(int(tail))
    return tuple(sorted(out))


def server_changed(sock: str, index: int) -> bool:
    """Whether ``/dev/nbd<index>`` was last connected to another server than the one on
    ``sock`` now (or its note is missing)."""
    try:
        with open(_note_path(sock, index)) as f:
            return f.read().strip() != str(os.stat(sock).st_ino)
    except FileNotFoundError:
        return True


def note_server(sock: str, index: int) -> None:
    """Note that ``/dev/nbd<index>`` is connected to the server on ``sock`` now."""
    tmp = f"{_note_path(sock, index)}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.stat(sock).st_ino}\n")
    os.replace(tmp, _note_path(sock, index))


def reconnect_noted(sock: str) -> list[int]:
    """Give every device noted for ``sock`` that is still connected (with a backend) and
    whose server changed a new connection to the server on ``sock`` (its keeper started it
    again: the devices' waiting I/O goes on). Returns the devices reconnected."""
    done = []
    for index in noted(sock):
        try:
            d = device(index)
            if d.connected and d.backend and server_changed(sock, index):
                reconnect(index, sock, d.backend)
                note_server(sock, index)
                done.append(index)
            elif not d.connected:
                os.unlink(_note_path(sock, index))
        except (KernelError, OSError) as e:
            log.warning("reconnect nbd%d to %s: %s", index, sock, e)
    return done


# --- sysfs ----------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError, OSError):
        return ""


def device(index: int) -> NbdDevice:
    base = f"{SYS_BLOCK}/nbd{index}"
    if not os.path.isdir(base):
        raise KernelError("find nbd device", f"nbd{index}", errno.ENODEV)
    connected = os.path.exists(f"{base}/pid")
    size = _read(f"{base}/size")
    try:
        holders = tuple(sorted(os.listdir(f"{base}/holders")))
    except FileNotFoundError:
        holders = ()
    return NbdDevice(index, _read(f"{base}/backend") if connected else "", connected,
                     int(size) * 512 if size.isdigit() else 0, holders)


def devices() -> list[NbdDevice]:
    """Every nbd device of this host."""
    try:
        names = os.listdir(SYS_BLOCK)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith("nbd") and n[3:].isdigit():
            with contextlib.suppress(KernelError):
                out.append(device(int(n[3:])))
    return sorted(out, key=lambda d: d.index)


def find(backend: str, first: tuple[int, ...] = ()) -> list[NbdDevice]:
    """The connected nbd devices named ``backend``; the devices ``first`` are looked at
    first, and when one of them is it, no other (a host has 16 or more: a sysfs walk)."""
    for i in first:
        with contextlib.suppress(KernelError):
            d = device(i)
            if d.connected and d.backend == backend:
                return [d]
    out = []
    for n in os.listdir(SYS_BLOCK) if os.path.isdir(SYS_BLOCK) else []:
        if n.startswith("nbd") and n[3:].isdigit() and os.path.exists(f"{SYS_BLOCK}/{n}/pid"):
            with contextlib.suppress(KernelError):
                d = device(int(n[3:]))
                if d.connected and d.backend == backend:
                    out.append(d)
    return sorted(out, key=lambda d: d.index)


if __name__ == "__main__":  # python3 -m cowdisk.kernel.nbd reconnect SOCKET (a server's keeper runs it)
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "reconnect":
        sys.exit("usage: python3 -m cowdisk.kernel.nbd reconnect SOCKET")
    logging.basicConfig(level=logging.INFO, format="cowdisk nbd: %(message)s")
    print(f"cowdisk nbd: reconnected {reconnect_noted(sys.argv[2]) or 'no device'} to {sys.argv[2]}", flush=True)
