"""A small QEMU runner for VMM end-to-end tests (TCG, serial line protocol, QMP).

    with Vm(guest, drive=link, workdir=tmp) as vm:      # boots
        bootid = vm.wait_ready()
        vm.checkpoint(state)                             # stop + migrate to file + quit
    with Vm(guest, drive=link, workdir=tmp, incoming=state) as vm:
        vm.wait_incoming(); vm.cont()
        vm.command("write2")

``machine="microvm"`` boots QEMU's microvm machine (virtio-mmio, no PCI); its kernel
command line gets ``tsc_early_khz=`` (see :func:`microvm_cmdline` for why).

Every Vm kills only the QEMU process it started, by PID, when its ``with`` block
ends (normally or by exception); QEMU also gets SIGKILL if the test process dies
(``setpriv --pdeathsig KILL``).

Migration transport: ``fd`` (default) hands QEMU an open file through QMP
``getfd`` and migrates to ``fd:NAME``; the destination gets ``-incoming fd:N``.
QEMU writes the state file itself, so "completed" means the file is complete.
``exec`` uses ``exec:cat > STATE`` / ``-incoming "exec:cat STATE"`` as in the
usual recipe; there QEMU closes the pipe and reaps ``cat`` (SIGTERM, then
SIGKILL, after ~10 ms) at completion, which can race with ``cat`` draining the
pipe, so ``checkpoint`` with exec waits for the size to settle.
"""

from __future__ import annotations

import array
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cowdisk import drive as drive_cfg

QEMU = "qemu-system-x86_64"

# Every wait below is multiplied by this: nested TCG (QEMU inside the kernel lab, itself
# under TCG) is one to two orders of magnitude slower. COWDISK_VMM_TIMEOUT_SCALE sets it;
# the default is 20 inside the kernel lab, else 1.
TIMEOUT_SCALE = float(os.environ.get("COWDISK_VMM_TIMEOUT_SCALE")
                      or (20 if os.environ.get("COWDISK_IN_LAB") == "1" else 1))


class VmError(RuntimeError):
    pass


class QMPError(VmError):
    pass


class QMP:
    """Minimal QMP client over a unix socket (one command at a time)."""

    def __init__(self, path: str, connect_timeout: float = 30.0, alive=lambda: True):
        self.path = path
        self.events: list[dict] = []
        self._buf = b""
        connect_timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if not alive():
                    raise VmError("QEMU exited before its QMP socket was ready")
                if time.monotonic() > deadline:
                    raise VmError(f"QMP socket {path} not ready after {connect_timeout}s")
                time.sleep(0.05)
        self.sock = s
        greeting = self._recv(timeout=connect_timeout)
        if "QMP" not in greeting:
            raise QMPError(f"unexpected QMP greeting {greeting}")
        self.execute("qmp_capabilities")

    def _recv(self, timeout: float) -> dict:
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VmError(f"QMP: no reply within {timeout}s")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise VmError("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def execute(self, cmd: str, args: dict | None = None, timeout: float = 30.0,
                fds: list[int] | None = None) -> Any:
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
        else:
            self.sock.sendall(data)
        while True:
            reply = self._recv(timeout)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(f"QMP {cmd} failed: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _odirect_ok(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


class Vm:
    """One QEMU process. Use as a context manager; it starts on enter."""

    def __init__(self, guest, drive: str | os.PathLike, workdir: str | os.PathLike, *,
                 name: str = "vm", memory_mib: int = 256, incoming: str | os.PathLike | None = None,
                 transport: str = "fd", cache: str = "auto", extra_args: list[str] = (),
                 cmdline: str | None = None, machine: str = "q35", drive_form: str = "qemu",
                 drive_args: list[str] | None = None):
        if transport not in ("fd", "exec"):
            raise ValueError("transport is 'fd' or 'exec'")
        self.guest = guest
        self.drive = os.fspath(drive)
        self.workdir = Path(workdir)
        self.name = name
        self.memory_mib = memory_mib
        self.incoming = os.fspath(incoming) if incoming else None
        self.transport = transport
        self.cache = cache
        self.extra_args = list(extra_args)
        self.cmdline = cmdline or guest.cmdline
        self.machine = machine          # q35 or microvm (virtio-mmio, no PCI)
        self.drive_form = drive_form    # cowdisk.drive's "qemu" (-drive) or "qemu-blockdev"
        self.drive_args = drive_args    # given: the drive's QEMU arguments as they are (e.g. a qcow2 overlay)
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self.lines: list[str] = []
        self._cursor = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._sockdir: str | None = None
        self._tag = 0
        self.times: dict[str, float] = {}
        self.log_path = self.workdir / f"{name}.serial.log"
        self.err_path = self.workdir / f"{name}.stderr.log"
        self._t0 = 0.0

    # -- lifecycle -------------------------------------------------------------------
    def argv(self, incoming_fd: int | None = None) -> list[str]:
        cache = self.cache
        if cache == "auto":
            cache = "none" if _odirect_ok(self.drive) else "writeback"
        qmp_path = os.path.join(self._sockdir, "qmp.sock")
        argv = [QEMU, "-name", self.name, "-nodefaults", "-no-user-config",
                "-machine", f"{self.machine},accel=tcg", "-cpu", "max", "-m", str(self.memory_mib),
                "-display", "none", "-no-reboot",
                "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0",
                "-qmp", f"unix:{qmp_path},server=on,wait=off",
                "-kernel", self.guest.kernel, "-initrd", self.guest.initrd,
                "-append", self.kernel_cmdline()]
        if self.drive_args is not None:
            argv += self.drive_args
        else:
            argv += drive_cfg.config(self.drive_form, self.drive,
                                     drive_cfg.DriveOptions(cache=cache, machine=self.machine))
        if self.incoming:
            if self.transport == "fd":
                argv += ["-incoming", f"fd:{incoming_fd}"]
            else:
                argv += ["-incoming", f"exec:cat {shlex.quote(self.incoming)}"]
        return argv + self.extra_args

    def kernel_cmdline(self) -> str:
        """The guest's command line; on microvm with the TSC's rate given (see microvm_cmdline)."""
        if self.machine.split(",")[0] == "microvm":
            return microvm_cmdline(self.cmdline)
        return self.cmdline

    def start(self) -> "Vm":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir = tempfile.mkdtemp(prefix="cdvm-", dir=_sock_parent())
        in_fd = None
        pass_fds: tuple[int, ...] = ()
        if self.incoming and self.transport == "fd":
            in_fd = os.open(self.incoming, os.O_RDONLY | os.O_CLOEXEC)
            pass_fds = (in_fd,)
        argv = self.argv(in_fd)
        launcher = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        self._err = open(self.err_path, "wb")
        self._log = open(self.log_path, "a", buffering=1)
        self._log.write(f"# {shlex.join(argv)}\n")
        self._t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(launcher + argv, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._err,
                                         pass_fds=pass_fds, start_new_session=True)
        finally:
            if in_fd is not None:
                os.close(in_fd)
        self._reader = threading.Thread(target=self._read_loop, name=f"{self.name}-serial",
                                        daemon=True)
        self._reader.start()
        self.qmp = QMP(os.path.join(self._sockdir, "qmp.sock"), alive=self.alive)
        return self

    def __enter__(self) -> "Vm":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Make sure our QEMU (only ours, by PID) is gone; release everything."""
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._reader:
            self._reader.join(timeout=5)  # QEMU is gone, so its stdout hits EOF
        if p is not None:
            for f in (p.stdin, p.stdout):
                try:
                    if f:
                        f.close()
                except OSError:
                    pass
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        for f in ("_err", "_log"):
            fh = getattr(self, f, None)
            if fh:
                fh.close()
                setattr(self, f, None)
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    # -- serial ----------------------------------------------------------------------
    def _read_loop(self) -> None:
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            if done:
                with self._cond:
                    for raw in done:
                        line = raw.decode(errors="replace").rstrip("\r")
                        self.lines.append(line)
                        if self._log:
                            self._log.write(f"{time.monotonic() - self._t0:8.3f} {line}\n")
                    self._cond.notify_all()
        with self._cond:
            if buf:
                self.lines.append(buf.decode(errors="replace"))
            self._cond.notify_all()

    def tail(self, n: int = 30) -> str:
        out = "\n".join(self.lines[-n:])
        try:
            err = self.err_path.read_text(errors="replace")[-2000:]
        except OSError:
            err = ""
        return f"--- serial (last {n}) ---\n{out}\n--- qemu stderr ---\n{err}"

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        """Wait for a serial line matching ``pattern`` (regex, search), after the cursor."""
        rx = re.compile(pattern)
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self.lines):
                    line = self.lines[self._cursor]
                    self._cursor += 1
                    if "COWDISK-PANIC" in line:
                        raise VmError(f"guest panicked: {line}\n{self.tail()}")
                    m = rx.search(line)
                    if m:
                        return m
                if not self.alive():
                    raise VmError(f"QEMU exited (rc={self.proc.returncode}) while waiting "
                                  f"for {pattern!r}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmError(f"timeout {timeout}s waiting for {pattern!r}\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_ready(self, timeout: float = 90.0) -> str:
        m = self.wait_line(r"COWDISK-READY (\S+)", timeout)
        self.times["boot"] = time.monotonic() - self._t0
        return m.group(1)

    def command(self, verb: str, *args: str, timeout: float = 30.0) -> str:
        """Send ``CMD <tag> verb args``; return the guest's result text; raise on ERR."""
        self._tag += 1
        tag = f"{os.getpid()}.{self._tag}"
        self.send(" ".join(["CMD", tag, verb, *args]))
        m = self.wait_line(rf"COWDISK-(OK|ERR) {re.escape(tag)}(?: (.*))?$", timeout)
        if m.group(1) == "ERR":
            raise VmError(f"guest: {verb} failed: {m.group(2)}")
        return (m.group(2) or "").strip()

    # -- QMP ---------------------------------------------------------------------------
    def status(self) -> str:
        return self.qmp.execute("query-status")["status"]

    def _wait_migration(self, timeout: float) -> dict:
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.execute("query-migrate")
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise VmError(f"migration {st}: {info}\n{self.tail()}")
            if not self.alive():
                raise VmError(f"QEMU exited during migration\n{self.tail()}")
            if time.monotonic() > deadline:
                raise VmError(f"migration not completed after {timeout}s: {info}")
            time.sleep(0.05)

    def checkpoint(self, state: str | os.PathLike, timeout: float = 120.0,
                   quit: bool = True) -> dict:
        """Pause the VM and save its state to ``state`` (migrate to file), then quit.

        Returns migration info; sets ``times['checkpoint']`` (stop to file complete).
        """
        state = os.fspath(state)
        t = time.monotonic()
        self.qmp.execute("stop")
        if self.transport == "fd":
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                self.qmp.execute("getfd", {"fdname": "ckpt"}, fds=[fd])
            finally:
                os.close(fd)
            self.qmp.execute("migrate", {"uri": "fd:ckpt"})
        else:
            self.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(state)}"})
        info = self._wait_migration(timeout)
        if self.transport == "exec":
            _wait_size_settles(state)
        with open(state, "rb") as f:
            os.fsync(f.fileno())
        self.times["checkpoint"] = time.monotonic() - t
        if quit:
            self.quit()
        return info

    def wait_incoming(self, timeout: float = 120.0) -> dict:
        """Wait until the incoming migration has loaded; sets ``times['restore_load']``."""
        info = self._wait_migration(timeout)
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        while self.status() == "inmigrate":
            if time.monotonic() > deadline:
                raise VmError("VM still inmigrate after the migration completed")
            time.sleep(0.05)
        self.times["restore_load"] = time.monotonic() - self._t0
        return info

    def cont(self) -> None:
        self.qmp.execute("cont")
        self.times["restore"] = time.monotonic() - self._t0

    def quit(self, timeout: float = 30.0) -> int:
        try:
            self.qmp.execute("quit", timeout=timeout)
        except VmError:
            pass  # QEMU may close the socket before replying
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout * TIMEOUT_SCALE)
        except subprocess.TimeoutExpired:
            raise VmError(f"QEMU did not exit within {timeout}s\n{self.tail()}") from None
        if self._reader:
            self._reader.join(timeout=5)
        return rc

    def poweroff(self, timeout: float = 60.0) -> int:
        self.command("poweroff", timeout=timeout)
        return self.wait_exit(timeout)


def overlay(backing: str, path: str | os.PathLike) -> str:
    """A new qcow2 overlay at ``path`` over the raw image ``backing`` (a file name or any
    name QEMU opens: an NBD URL, a ``json:`` form), made by ``qemu-img``; returns its path."""
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, os.fspath(path)],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise VmError(f"qemu-img create {path} over {backing}: {p.stderr.strip()}")
    return os.fspath(path)


def lazy_overlay(url: str, path: str | os.PathLike, *, reconnect_delay: int | None = None) -> str:
    """A new qcow2 overlay at ``path`` whose backing file is the lazy template served at
    ``url`` (``nbd+unix:///?socket=...``, as ``cowdisk template pull --lazy`` prints it), as
    docs/remote.md shows: QEMU's own NBD client reads the template, the guest's writes stay
    in the overlay. ``reconnect_delay`` (s): the backing is given in QEMU's ``json:`` form
    with ``reconnect-delay``, so a restarted server is reconnected."""
    prefix = "nbd+unix:///?socket="
    if not url.startswith(prefix):
        raise ValueError(f"not a lazy template's NBD URL: {url!r}")
    backing = url
    if reconnect_delay is not None:
        backing = "json:" + json.dumps({"file": {"driver": "nbd", "server": {"type": "unix", "path": url[len(prefix):]},
                                                 "reconnect-delay": reconnect_delay}}, separators=(",", ":"))
    return overlay(backing, path)


def qcow2_drive(path: str | os.PathLike) -> list[str]:
    """QEMU's ``-drive`` for a qcow2 overlay on q35 (virtio-blk-pci; writeback: the overlay
    may be on a filesystem without O_DIRECT)."""
    return ["-drive", f"file={os.fspath(path)},format=qcow2,if=virtio,cache=writeback,id=rootfs"]


def host_tsc_khz(default: int = 2_000_000) -> int:
    """The host CPU's clock in kHz, from /proc/cpuinfo's first ``cpu MHz`` (``default`` if none)."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", f.read(), re.M)
    except OSError:
        m = None
    return round(float(m.group(1)) * 1000) if m and float(m.group(1)) > 0 else default


def microvm_cmdline(cmdline: str) -> str:
    """``cmdline`` plus ``tsc_early_khz=`` (the host's clock) unless it already sets one.

    Under TCG the guest's TSC ticks at the host's TSC rate, and the kernel calibrates it
    against the i8254 PIT: a few busy loops of 10 to 50 ms that fail when the host
    deschedules QEMU in the middle (a loaded host). q35 then falls back to its HPET or ACPI
    PM timer; microvm has neither, so the kernel marks the TSC unusable and hangs in boot
    (``tsc: Unable to calibrate against PIT`` / ``No reference (HPET/PMTIMER) available``,
    then nothing). ``tsc_early_khz`` skips the calibration. The rate need not be exact: a
    wrong one only makes the guest's clock run fast or slow (1000000 on this 2.6 GHz host
    still boots).
    """
    if re.search(r"(^|\s)tsc_early_khz=", cmdline):
        return cmdline
    return f"{cmdline} tsc_early_khz={host_tsc_khz()}"


def _sock_parent() -> str:
    """Where the QMP socket's directory goes: the temp dir ($TMPDIR) if its path is short
    (sun_path is 108 bytes), else /tmp. In the kernel lab /tmp is 9p, where a socket
    cannot be bound (ENXIO); there $TMPDIR is the lab's ext4 scratch disk."""
    t = tempfile.gettempdir()
    return t if len(t) <= 60 else "/tmp"


def _wait_size_settles(path: str, quiet: float = 0.3, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = os.path.getsize(path)
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
