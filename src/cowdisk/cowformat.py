"""Offline reader, checker, flattener and writer of the dm-snapshot persistent COW format.

A dm-snapshot volume (``snapshot <origin> <cow> P <C>``) keeps its changes in a COW
file laid out as follows (all integers little-endian; see
``docs/reference/dm-snapshot-cow-format.md`` for the sources):

* chunk 0: header ``magic u32 = 0x70416E53 ("SnAp") | valid u32 | version u32 = 1 |
  chunk_size u32 (sectors)``, zeros to the end of the chunk;
* metadata area ``N`` at chunk ``1 + N*S`` with ``S = E + 1`` and ``E = chunk_bytes/16``
  records per area; each record is ``old_chunk u64 | new_chunk u64``; the first record
  with ``new_chunk == 0`` ends the table, and the scan goes on to the next area only
  after a full one;
* data chunks everywhere else from chunk 2 on.

Nothing here needs device-mapper, root or a loop device: the functions read and write
plain files, so a checkpointed volume can be inspected, diffed and flattened on any
host. Stdlib only.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .errors import CowFormatError, InvalidArgument, SnapshotInvalid
from .progress import Progress

__all__ = [
    "MAGIC",
    "SECTOR",
    "Header",
    "Problem",
    "Report",
    "CowFormatError",
    "read_header",
    "exceptions",
    "inspect",
    "flatten",
    "changed_ranges",
    "write_cow",
    "expected_new_chunk",
    "min_cow_chunks",
]

MAGIC = 0x70416E53  # "SnAp" read as a little-endian u32
SECTOR = 512
VERSION = 1
HEADER = struct.Struct("<IIII")
RECORD = struct.Struct("<QQ")
CHUNK_NUMBER_LIMIT = 1 << 56  # DM_CHUNK_NUMBER_BITS: the loader reads higher bits as a run length
MAX_CHUNK_SECTORS = (2**31 - 1) >> 9  # INT_MAX >> SECTOR_SHIFT
DEFAULT_CHUNK_SECTORS = 8  # what cowdisk puts in its tables
IO_BLOCK = 1 << 20


# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    magic: int
    valid: int
    version: int
    chunk_size: int  # sectors

    @property
    def initialised(self) -> bool:
        """False for a brand-new (all-zero) store: the kernel formats it on first activation."""
        return self.magic != 0

    @property
    def magic_ok(self) -> bool:
        return self.magic == MAGIC

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_size * SECTOR

    @property
    def exceptions_per_area(self) -> int:
        return self.chunk_bytes // RECORD.size

    def pack(self) -> bytes:
        return HEADER.pack(self.magic, self.valid, self.version, self.chunk_size)


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" (the COW is corrupt or unusable) or "warning"
    code: str  # short stable identifier, e.g. "duplicate-old-chunk"
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.code}: {self.message}"


@dataclass
class Report:
    path: str
    file_size: int
    header: Header
    records: list[tuple[int, int]] = field(default_factory=list)
    next_free: int = 2
    current_area: int = 0
    cow_sectors: int = 0
    status: str = ""
    problems: list[Problem] = field(default_factory=list)

    @property
    def record_count(self) -> int:
        return len(self.records)

    @property
    def changed_chunks(self) -> list[int]:
        return sorted({old for old, _ in self.records})

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> set[str]:
        return {p.code for p in self.problems}

    def summary(self) -> str:
        h = self.header
        if not h.initialised:
            head = "uninitialised (magic 0): the kernel formats it on activation, 0 records"
        else:
            head = (f"magic {h.magic:#010x} valid {h.valid} version {h.version} "
                    f"chunk {h.chunk_size} sectors, {self.record_count} records")
        lines = [f"{self.path}: {head}", f"status {self.status}"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def area_chunk(area: int, chunk_sectors: int) -> int:
    """COW chunk index of metadata area ``area``."""
    return 1 + area * (chunk_sectors * SECTOR // RECORD.size + 1)


def is_metadata_chunk(n: int, chunk_sectors: int) -> bool:
    return n % (chunk_sectors * SECTOR // RECORD.size + 1) == 1


def expected_new_chunk(k: int, chunk_sectors: int) -> int:
    """The COW chunk the kernel allocates for the ``k``-th exception (0-based), no crash holes."""
    e = chunk_sectors * SECTOR // RECORD.size
    return 2 + k + k // e


def min_cow_chunks(changed: int, chunk_sectors: int = DEFAULT_CHUNK_SECTORS) -> int:
    """Chunks a COW needs to hold ``changed`` chunks without the snapshot turning Invalid."""
    e = chunk_sectors * SECTOR // RECORD.size
    if changed <= 0:
        return 2
    areas = -(-changed // e)
    n = 1 + changed + areas
    if changed % e == 0:
        n += 1  # the next area is zeroed when one fills up
    return n


def _origin_len(origin_size: int) -> int:
    """Bytes the snapshot device exposes: a loop device has floor(size/512) sectors."""
    return origin_size // SECTOR * SECTOR


def _check_chunk_size(c: int) -> str | None:
    if c == 0:
        return "chunk size 0"
    if not _is_pow2(c):
        return f"chunk size {c} sectors is not a power of two"
    if c > MAX_CHUNK_SECTORS:
        return f"chunk size {c} sectors is larger than {MAX_CHUNK_SECTORS}"
    return None


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _read_header_fd(fd: int) -> Header:
    raw = os.pread(fd, HEADER.size, 0)
    raw = raw + bytes(HEADER.size - len(raw))  # a short (fresh) file reads as zeros
    return Header(*HEADER.unpack(raw))


def read_header(path: str | os.PathLike[str]) -> Header:
    """The 16-byte header of a COW file (``magic == 0`` means uninitialised)."""
    fd = _open_ro(path)
    try:
        return _read_header_fd(fd)
    finally:
        os.close(fd)


def _open_ro(path: str | os.PathLike[str]) -> int:
    try:
        return os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CowFormatError(f"open COW {os.fspath(path)}: {e.strerror}", op="read COW",
                             obj=os.fspath(path)) from None


def _header_errors(h: Header) -> list[Problem]:
    out: list[Problem] = []
    if not h.initialised:
        return out
    if h.magic != MAGIC:
        out.append(Problem("error", "bad-magic",
                           f"magic {h.magic:#010x} is not SnAp ({MAGIC:#010x}): the kernel refuses it "
                           "(\"Invalid or corrupt snapshot\")"))
        return out
    if h.version != VERSION:
        out.append(Problem("error", "bad-version",
                           f"version {h.version}: the kernel handles only version {VERSION}"))
    msg = _check_chunk_size(h.chunk_size)
    if msg:
        out.append(Problem("error", "bad-chunk-size", msg))
    if h.valid == 0:
        out.append(Problem("error", "invalid",
                           "valid flag is 0: the snapshot was invalidated (COW overflow or I/O error) "
                           "and has lost at least one write"))
    return out


@dataclass
class _Scan:
    records: list[tuple[int, int]]
    current_area: int
    terminator: int  # index of the terminator in current_area
    stale: list[tuple[int, int, int, int]]  # (area, index, old, new) non-zero after the terminator
    truncated: str | None  # why the scan could not finish


def _scan(fd: int, chunk_sectors: int, cow_bytes: int) -> _Scan:
    """Walk the metadata areas exactly like the kernel's ``read_exceptions``."""
    b = chunk_sectors * SECTOR
    e = b // RECORD.size
    records: list[tuple[int, int]] = []
    stale: list[tuple[int, int, int, int]] = []
    area = 0
    while True:
        off = area_chunk(area, chunk_sectors) * b
        if off + b > cow_bytes:
            return _Scan(records, area, 0, stale,
                         f"metadata area {area} (bytes {off}..{off + b}) is past the end of the COW "
                         f"({cow_bytes} bytes): the kernel fails to load it (truncated COW)")
        raw = os.pread(fd, b, off)
        if len(raw) < b:
            raw += bytes(b - len(raw))
        full = True
        term = e
        for i, (old, new) in enumerate(RECORD.iter_unpack(raw)):
            if new == 0:
                term = i
                full = False
                break
            records.append((old, new))
        if not full:
            tail = memoryview(raw)[(term + 1) * RECORD.size:]
            if any(tail):
                for j, (old, new) in enumerate(RECORD.iter_unpack(tail), start=term + 1):
                    if old or new:
                        stale.append((area, j, old, new))
            return _Scan(records, area, term, stale, None)
        area += 1


def _walk(fd: int, path: str) -> tuple[Header, _Scan | None, int]:
    size = os.fstat(fd).st_size
    h = _read_header_fd(fd)
    if not h.initialised:
        return h, None, size
    errs = [p for p in _header_errors(h) if p.code != "invalid"]
    if errs:
        raise CowFormatError(f"COW {path}: " + "; ".join(p.message for p in errs),
                             op="read COW", obj=path)
    return h, _scan(fd, h.chunk_size, _origin_len(size)), size


def exceptions(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The exception table ``[(old_chunk, new_chunk), ...]`` in on-disk order.

    An uninitialised COW has none. Raises :class:`CowFormatError` for a bad magic,
    version or chunk size, or a truncated table (an area past the end of the file).
    """
    p = os.fspath(path)
    fd = _open_ro(p)
    try:
        h, scan, _ = _walk(fd, p)
    finally:
        os.close(fd)
    if scan is None:
        return []
    if scan.truncated:
        raise CowFormatError(f"COW {p}: {scan.truncated}", op="read COW", obj=p)
    return scan.records


def inspect(
    cow_path: str | os.PathLike[str],
    origin_size: int | None = None,
    *,
    chunk_sectors: int | None = None,
) -> Report:
    """Read and check a COW file; never raises for a malformed file, only for I/O errors.

    ``origin_size`` (bytes of the template/origin) enables the "old_chunk past the
    origin's end" check. ``chunk_sectors`` is the chunk size the table would use:
    it gives the geometry of an uninitialised COW (default 8) and, for an
    initialised one, a mismatch is a warning (the header wins in the kernel).

    ``Report.status`` is what ``dmsetup status`` would print right after activating
    this file: ``<next_free*C>/<cow sectors> <(current_area+2)*C>``, or ``Invalid``.
    """
    p = os.fspath(cow_path)
    fd = _open_ro(p)
    try:
        size = os.fstat(fd).st_size
        h = _read_header_fd(fd)
        cow_sectors = size // SECTOR
        rep = Report(path=p, file_size=size, header=h, cow_sectors=cow_sectors)
        if not h.initialised:
            c = chunk_sectors or DEFAULT_CHUNK_SECTORS
            if cow_sectors < 2 * c:
                rep.problems.append(Problem("warning", "too-small",
                                            f"{size} bytes cannot hold a header and one area of {c}-sector chunks"))
                rep.status = "Invalid"
            else:
                rep.status = f"{2 * c}/{cow_sectors} {2 * c}"
            return rep
        rep.problems += _header_errors(h)
        fatal = [q for q in rep.problems if q.code in ("bad-magic", "bad-version", "bad-chunk-size")]
        if fatal:
            rep.status = "(load fails)"
            return rep
        c = h.chunk_size
        if chunk_sectors is not None and chunk_sectors != c:
            rep.problems.append(Problem("warning", "chunk-size-mismatch",
                                        f"header chunk size {c} overrides table chunk size {chunk_sectors}"))
        scan = _scan(fd, c, cow_sectors * SECTOR)
    finally:
        os.close(fd)

    rep.records = scan.records
    rep.current_area = scan.current_area
    if scan.truncated:
        rep.problems.append(Problem("error", "truncated", scan.truncated))
    _check_records(rep, c, origin_size)
    for area, idx, old, new in scan.stale:
        rep.problems.append(Problem("warning", "stale-record",
                                    f"area {area} record {idx} ({old}, {new}) follows the terminator at "
                                    f"index {scan.terminator}: a torn area write; the kernel ignores it now "
                                    "but may serve it again once the gap is refilled"))
    # next_free as the loader computes it
    nf = 2
    for _, new in scan.records:
        if new >= nf:
            nf = new + 1
    if is_metadata_chunk(nf, c):
        nf += 1
    rep.next_free = nf
    if h.valid == 0:
        rep.status = "Invalid"
    elif scan.truncated:
        rep.status = "(load fails)"
    else:
        rep.status = f"{nf * c}/{cow_sectors} {(scan.current_area + 2) * c}"
    return rep


def _check_records(rep: Report, c: int, origin_size: int | None) -> None:
    b = c * SECTOR
    cow_chunks = rep.cow_sectors * SECTOR // b
    origin_chunks = None
    if origin_size is not None:
        origin_chunks = -(-_origin_len(origin_size) // b)
    seen_old: dict[int, int] = {}
    seen_new: dict[int, int] = {}
    irregular = 0
    first_irregular = None
    for k, (old, new) in enumerate(rep.records):
        where = f"record {k} ({old}, {new})"
        if old in seen_old:
            rep.problems.append(Problem("error", "duplicate-old-chunk",
                                        f"{where}: origin chunk {old} already mapped by record {seen_old[old]}"))
        else:
            seen_old[old] = k
        if new in seen_new:
            rep.problems.append(Problem("error", "duplicate-new-chunk",
                                        f"{where}: COW chunk {new} already used by record {seen_new[new]}"))
        else:
            seen_new[new] = k
        if new >= CHUNK_NUMBER_LIMIT:
            rep.problems.append(Problem("error", "new-chunk-too-large",
                                        f"{where}: new_chunk >= 2^56, the kernel reads the high bits as a run length"))
        elif new < 2:
            rep.problems.append(Problem("error", "new-chunk-in-header",
                                        f"{where}: new_chunk {new} < 2 points at the header or area 0"))
        elif is_metadata_chunk(new, c):
            rep.problems.append(Problem("error", "new-chunk-in-metadata",
                                        f"{where}: new_chunk {new} is a metadata area slot"))
        elif new >= cow_chunks:
            rep.problems.append(Problem("error", "new-chunk-past-eof",
                                        f"{where}: COW chunk {new} is past the end of the file "
                                        f"({cow_chunks} whole chunks)"))
        if origin_chunks is not None and old >= origin_chunks:
            rep.problems.append(Problem("error", "old-chunk-past-origin",
                                        f"{where}: origin chunk {old} is past the origin's end "
                                        f"({origin_chunks} chunks of {b} bytes)"))
        if new != expected_new_chunk(k, c):
            irregular += 1
            if first_irregular is None:
                first_irregular = k
    if irregular:
        rep.problems.append(Problem("warning", "irregular-allocation",
                                    f"{irregular} records do not follow the kernel's dense allocation "
                                    f"(first: record {first_irregular}); harmless after a crash"))


def _refuse(rep: Report, what: str) -> None:
    if rep.header.initialised and rep.header.valid == 0 and rep.header.magic == MAGIC:
        raise SnapshotInvalid(
            f"{what}: COW {rep.path} is marked Invalid (valid flag 0: it overflowed or hit an I/O "
            "error and lost writes); refusing to use it", op=what, obj=rep.path)
    errs = rep.errors
    if errs:
        raise CowFormatError(f"{what}: COW {rep.path} is corrupt: " + "; ".join(p.message for p in errs[:5])
                             + (f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""),
                             op=what, obj=rep.path)


def changed_ranges(
    cow_path: str | os.PathLike[str], origin_size: int | None = None
) -> list[tuple[int, int]]:
    """Byte ranges ``[(offset, length), ...]`` of the origin the COW remaps, merged and sorted.

    A remapped chunk was written, not necessarily changed. With ``origin_size`` the
    last range is clamped to the snapshot device's length. Refuses a corrupt COW.
    """
    rep = inspect(cow_path, origin_size)
    _refuse(rep, "diff")
    b = rep.header.chunk_bytes
    limit = _origin_len(origin_size) if origin_size is not None else None
    out: list[tuple[int, int]] = []
    for x in rep.changed_chunks:
        start, end = x * b, (x + 1) * b
        if limit is not None:
            end = min(end, limit)
            if start >= end:
                continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


# ---------------------------------------------------------------------------
# Flatten
# ---------------------------------------------------------------------------


def _pread_full(fd: int, n: int, off: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        d = os.pread(fd, n - got, off + got)
        if not d:
            break
        parts.append(d)
        got += len(d)
    data = b"".join(parts)
    if got < n:
        data += bytes(n - got)
    return data


def _next_data(fd: int, pos: int, end: int) -> int:
    """First offset >= pos that may hold data (``end`` if none); ``pos`` when unsure."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), end)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return end
        return pos


def flatten(
    origin_path: str | os.PathLike[str],
    cow_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> None:
    """Write ``out_path``: the origin with the COW's chunks applied, as a new sparse file.

    The output is as long as the snapshot device (origin size rounded down to 512
    bytes) and never reads the origin or a COW chunk past that length. All-zero
    blocks are not written. ``out_path`` must not exist; it is removed again on any
    failure. Refuses an Invalid or corrupt COW with a :class:`CowdiskError`
    (:class:`SnapshotInvalid` / :class:`CowFormatError`) naming the file and the problem.
    """
    origin = os.fspath(origin_path)
    cow = os.fspath(cow_path)
    out = os.fspath(out_path)
    try:
        ofd = os.open(origin, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CowFormatError(f"flatten: open origin {origin}: {e.strerror}", op="flatten", obj=origin) from None
    try:
        origin_size = os.fstat(ofd).st_size
        rep = inspect(cow, origin_size)
        _refuse(rep, "flatten")
        length = _origin_len(origin_size)
        if rep.header.initialised:
            b = rep.header.chunk_bytes
            remap = {old: new for old, new in rep.records}
        else:
            b = DEFAULT_CHUNK_SECTORS * SECTOR
            remap = {}
        cfd = _open_ro(cow)
        try:
            try:
                wfd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise CowFormatError(f"flatten: create {out}: {e.strerror}", op="flatten", obj=out) from None
            try:
                _flatten_into(ofd, cfd, wfd, length, b, remap, progress)
                os.fsync(wfd)
            except BaseException:
                os.close(wfd)
                try:
                    os.unlink(out)
                except OSError:
                    pass
                raise
            os.close(wfd)
        finally:
            os.close(cfd)
    finally:
        os.close(ofd)


def _flatten_into(ofd: int, cfd: int, wfd: int, length: int, b: int,
                  remap: Mapping[int, int], progress: Progress | None) -> None:
    os.ftruncate(wfd, length)
    block = max(IO_BLOCK, b)  # a whole number of chunks (both are powers of two)
    zero_gran = min(b, 64 * 1024)
    zero = bytes(block)
    zgran = bytes(zero_gran)
    remapped = sorted(remap)
    ri = 0  # index of the first remapped chunk not before the current block
    pos = 0
    data_at = 0  # origin: no data before this offset (from SEEK_DATA)
    while pos < length:
        n = min(block, length - pos)
        first, last = pos // b, (pos + n - 1) // b
        while ri < len(remapped) and remapped[ri] < first:
            ri += 1
        has_cow = ri < len(remapped) and remapped[ri] <= last
        if data_at <= pos:
            data_at = _next_data(ofd, pos, length)
        if data_at >= pos + n:
            buf = bytearray(n)  # origin hole
            if not has_cow:
                pos += n
                if progress:
                    progress(pos, length)
                continue
        else:
            buf = bytearray(_pread_full(ofd, n, pos))
        j = ri
        while j < len(remapped) and remapped[j] <= last:
            x = remapped[j]
            s = x * b - pos
            m = min(b, length - x * b)
            buf[s:s + m] = _pread_full(cfd, m, remap[x] * b)
            j += 1
        # bytes/bytearray comparisons are memcmp; memoryview ones go element by element
        if buf != (zero if n == block else bytes(n)):
            with memoryview(buf) as mv:
                i = 0
                while i < n:  # write the runs of non-zero granules
                    g = min(zero_gran, n - i)
                    if buf[i:i + g] == zgran[:g]:
                        i += g
                        continue
                    k = i + g
                    while k < n:
                        g = min(zero_gran, n - k)
                        if buf[k:k + g] == zgran[:g]:
                            break
                        k += g
                    _pwrite_full(wfd, mv[i:k], pos + i)
                    i = k
        pos += n
        if progress:
            progress(pos, length)


def _pwrite_full(fd: int, data: memoryview | bytes, off: int) -> None:
    mv = memoryview(data)
    while mv:
        w = os.pwrite(fd, mv, off)
        mv = mv[w:]
        off += w


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------


def write_cow(
    path: str | os.PathLike[str],
    chunk_sectors: int,
    chunks: Mapping[int, bytes],
    origin_size: int,
    *,
    size: int | None = None,
    order: Iterable[int] | None = None,
) -> int:
    """Write a new COW file the kernel accepts, holding ``chunks`` (origin chunk -> data).

    Follows the kernel's own layout: header, records packed from area 0 index 0 in
    ``order`` (default: ascending chunk), ``new_chunk`` allocated 2, 3, ... skipping
    metadata slots, the rest of the last area zero, one more zeroed area when the
    last one is exactly full. Data shorter than a chunk is zero-padded (the origin's
    last partial chunk). ``size`` makes the file larger than the minimum (room for
    the kernel to allocate more). Replaces ``path``. Returns the file size.
    """
    p = os.fspath(path)
    msg = _check_chunk_size(chunk_sectors)
    if msg:
        raise InvalidArgument(f"write COW {p}: {msg}", op="write COW", obj=p)
    b = chunk_sectors * SECTOR
    e = b // RECORD.size
    length = _origin_len(origin_size)
    nchunks = -(-length // b)
    keys = list(order) if order is not None else sorted(chunks)
    if sorted(keys) != sorted(chunks) or len(set(keys)) != len(keys):
        raise InvalidArgument(f"write COW {p}: order must list every chunk exactly once", op="write COW", obj=p)
    for x in keys:
        if not 0 <= x < nchunks:
            raise InvalidArgument(f"write COW {p}: chunk {x} is outside the origin ({nchunks} chunks)",
                                  op="write COW", obj=p)
        if len(chunks[x]) > b:
            raise InvalidArgument(f"write COW {p}: data for chunk {x} is {len(chunks[x])} bytes > {b}",
                                  op="write COW", obj=p)
    d = len(keys)
    need = min_cow_chunks(d, chunk_sectors) * b
    total = need if size is None else size
    if total < need:
        raise InvalidArgument(f"write COW {p}: {total} bytes < the {need} needed for {d} chunks",
                              op="write COW", obj=p)
    tmp = f"{p}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, total)
        _pwrite_full(fd, Header(MAGIC, 1, VERSION, chunk_sectors).pack(), 0)
        for a in range(-(-d // e) if d else 0):
            recs = keys[a * e:(a + 1) * e]
            area = b"".join(RECORD.pack(x, expected_new_chunk(a * e + i, chunk_sectors))
                            for i, x in enumerate(recs))
            _pwrite_full(fd, area, area_chunk(a, chunk_sectors) * b)  # the rest stays a zero hole
        for k, x in enumerate(keys):
            data = chunks[x]
            if any(data):
                _pwrite_full(fd, data, expected_new_chunk(k, chunk_sectors) * b)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, p)
    return total
