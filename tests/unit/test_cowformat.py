"""cowdisk.cowformat without a kernel: writer/reader round trips, computed status, checks.

The byte layouts asserted here come from docs/reference/dm-snapshot-cow-format.md (sections 1-2); the same
functions are checked against a real dm-snapshot in tests/lab/test_cowformat_dm.py.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from cowdisk import cowformat as cf
from cowdisk.errors import CowdiskError, CowFormatError, SnapshotInvalid

B = 4096  # 8-sector chunks
E = 256
AREA1 = 1_056_768
AREA2 = 2_109_440


def pattern(n_bytes: int, seed: int = 0) -> bytes:
    """Every 16-byte cell says which chunk and offset it is (and the seed)."""
    cells = []
    for off in range(0, n_bytes, 16):
        cells.append(struct.pack("<IIQ", off // B, seed, off))
    return b"".join(cells)[:n_bytes]


def chunk_data(x: int, tag: int, n: int = B) -> bytes:
    return (struct.pack("<II", x, tag) + bytes([tag & 0xFF]) * 8) * (n // 16) + b"\xEE" * (n % 16)


def make_origin(tmp: Path, size: int, name: str = "origin.img") -> tuple[Path, bytes]:
    data = pattern(size)
    p = tmp / name
    p.write_bytes(data)
    return p, data


def expected_flat(origin: bytes, chunks: dict[int, bytes]) -> bytes:
    length = len(origin) // 512 * 512
    out = bytearray(origin[:length])
    for x, d in chunks.items():
        n = min(B, length - x * B)
        out[x * B:x * B + n] = (d + bytes(B))[:n]
    return bytes(out)


def flat(tmp: Path, origin: Path, cow: Path, name: str = "flat.img") -> bytes:
    out = tmp / name
    if out.exists():
        out.unlink()
    cf.flatten(origin, cow, out)
    return out.read_bytes()


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def record_at(k: int) -> int:
    """Byte offset of the k-th record (8-sector chunks)."""
    area, i = divmod(k, E)
    return cf.area_chunk(area, 8) * B + 16 * i


# -- writer layout -----------------------------------------------------------


def test_header_bytes_and_fresh_store(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    size = cf.write_cow(cow, 8, {}, 1 << 20)
    raw = cow.read_bytes()
    assert raw[:16] == bytes.fromhex("536E417001000000 0100000008000000".replace(" ", ""))
    assert size == len(raw) == 2 * B
    assert raw[16:] == bytes(len(raw) - 16)
    h = cf.read_header(cow)
    assert (h.magic, h.valid, h.version, h.chunk_size) == (cf.MAGIC, 1, 1, 8)
    assert h.initialised and h.exceptions_per_area == 256
    rep = cf.inspect(cow, 1 << 20)
    assert rep.ok and rep.problems == [] and rep.record_count == 0
    assert rep.status == "16/16 16"


def test_uninitialised_cow(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 64 * B + 700)
    cow = tmp_path / "cow.img"
    with open(cow, "wb") as f:
        f.truncate(80 * B)
    h = cf.read_header(cow)
    assert h.magic == 0 and not h.initialised
    assert cf.exceptions(cow) == []
    rep = cf.inspect(cow, len(data))
    assert rep.ok and rep.record_count == 0 and rep.changed_chunks == []
    assert rep.status == f"16/{80 * 8} 16"
    assert "uninitialised" in rep.summary()
    assert flat(tmp_path, origin, cow) == data[: len(data) // 512 * 512]
    assert cf.changed_ranges(cow) == []


@pytest.mark.parametrize("count,status_alloc,status_meta", [
    (0, 16, 16), (1, 24, 16), (255, 2056, 16), (256, 2072, 24), (257, 2080, 24), (600, 4832, 32),
])
def test_status_matches_reference_table(tmp_path: Path, count: int, status_alloc: int, status_meta: int) -> None:
    origin, data = make_origin(tmp_path, 1300 * B)
    chunks = {x: chunk_data(x, 1) for x in range(0, 2 * count, 2)}
    cow = tmp_path / "cow.img"
    size = cf.write_cow(cow, 8, chunks, len(data))
    assert size == cf.min_cow_chunks(count) * B
    rep = cf.inspect(cow, len(data))
    assert rep.problems == []
    assert rep.status == f"{status_alloc}/{size // 512} {status_meta}"


def test_round_trip_several_areas_random_order(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 1000 * B)
    rng = random.Random(6)
    keys = rng.sample(range(1000), 600)
    chunks = {x: chunk_data(x, 7) for x in keys}
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, chunks, len(data), order=keys)
    recs = cf.exceptions(cow)
    assert [old for old, _ in recs] == keys  # on-disk order = allocation order
    news = [new for _, new in recs]
    assert news == [2 + k + k // E for k in range(600)]
    assert 258 not in news and 515 not in news
    raw = cow.read_bytes()
    # record 256 is the first of area 1, record 512 the first of area 2; the rest of area 2 is zero
    assert struct.unpack_from("<QQ", raw, AREA1) == (keys[256], 259)
    assert struct.unpack_from("<QQ", raw, AREA2) == (keys[512], 516)
    assert raw[AREA2 + 16 * 88:AREA2 + B] == bytes(B - 16 * 88)
    rep = cf.inspect(cow, len(data))
    assert rep.problems == [] and rep.current_area == 2
    assert rep.changed_chunks == sorted(keys)
    assert flat(tmp_path, origin, cow) == expected_flat(data, chunks)


def test_exactly_one_full_area(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 300 * B)
    chunks = {x: chunk_data(x, 3) for x in range(256)}
    cow = tmp_path / "cow.img"
    size = cf.write_cow(cow, 8, chunks, len(data))
    assert size == 259 * B  # header, area 0, 256 data chunks, zeroed area 1
    raw = cow.read_bytes()
    assert raw[AREA1:AREA1 + B] == bytes(B)
    assert len(cf.exceptions(cow)) == 256
    rep = cf.inspect(cow, len(data))
    assert rep.current_area == 1 and rep.next_free == 259 and rep.problems == []
    assert flat(tmp_path, origin, cow) == expected_flat(data, chunks)
    assert cf.changed_ranges(cow) == [(0, 256 * B)]


def test_partial_last_chunk_is_clamped(tmp_path: Path) -> None:
    size = 16 * B + 1536 + 100  # the loop device hides the last 100 bytes
    origin, data = make_origin(tmp_path, size)
    length = 16 * B + 1536
    chunks = {16: chunk_data(16, 9, 1536), 3: chunk_data(3, 9)}
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, chunks, size)
    out = flat(tmp_path, origin, cow)
    assert len(out) == length
    assert out == expected_flat(data, chunks)
    assert out[16 * B:] == chunks[16]
    assert cf.changed_ranges(cow, size) == [(3 * B, B), (16 * B, 1536)]
    assert cf.changed_ranges(cow) == [(3 * B, B), (16 * B, B)]
    # chunk 17 would start past the end: the writer refuses it
    with pytest.raises(CowdiskError):
        cf.write_cow(tmp_path / "bad.img", 8, {17: b"x"}, size)


def test_changed_ranges_merge_runs(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    chunks = {x: b"\1" * B for x in (1, 2, 3, 7, 9, 10)}
    cf.write_cow(cow, 8, chunks, 64 * B, order=[9, 2, 7, 1, 10, 3])
    assert cf.changed_ranges(cow) == [(B, 3 * B), (7 * B, B), (9 * B, 2 * B)]


def test_other_chunk_size(tmp_path: Path) -> None:
    cb = 16 * 512  # 16 sectors: 512 records per area, stride 513
    origin, data = make_origin(tmp_path, 1200 * B)
    chunks = {x: bytes([x % 251 + 1]) * cb for x in range(0, 600, 1)}
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 16, chunks, len(data))
    recs = cf.exceptions(cow)
    assert len(recs) == 600 and recs[512] == (512, 515)  # area 1 at chunk 514
    rep = cf.inspect(cow, len(data))
    assert rep.problems == [] and rep.current_area == 1
    assert rep.status == f"{(2 + 600 + 1) * 16}/{os.path.getsize(cow) // 512} {3 * 16}"
    out = flat(tmp_path, origin, cow)
    exp = bytearray(data)
    for x, d in chunks.items():
        exp[x * cb:(x + 1) * cb] = d
    assert out == bytes(exp)


def test_writer_size_and_argument_checks(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    assert cf.write_cow(cow, 8, {0: b"a"}, 64 * B, size=40 * B) == 40 * B
    rep = cf.inspect(cow)
    assert rep.status == f"24/{40 * 8} 16"
    for bad in (0, 3, 12):
        with pytest.raises(CowdiskError):
            cf.write_cow(cow, bad, {}, 64 * B)
    with pytest.raises(CowdiskError):
        cf.write_cow(cow, 8, {0: bytes(B + 1)}, 64 * B)
    with pytest.raises(CowdiskError):
        cf.write_cow(cow, 8, {0: b"a"}, 64 * B, size=2 * B)
    assert cf.min_cow_chunks(262_144) == 263_170  # the 1 GiB example of docs/reference/dm-snapshot-cow-format.md section 2


# -- flatten behaviour -------------------------------------------------------


def test_flatten_output_is_sparse_and_reports_progress(tmp_path: Path) -> None:
    origin = tmp_path / "origin.img"
    with open(origin, "wb") as f:  # 16 MiB, data only in its first and last chunk
        f.truncate(16 << 20)
        f.write(b"\x11" * B)
        f.seek((16 << 20) - B)
        f.write(b"\x22" * B)
    chunks = {1000: b"\x33" * B, 1001: bytes(B)}  # a written-but-zero chunk
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, chunks, 16 << 20)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "flat.img"
    cf.flatten(origin, cow, out, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (16 << 20, 16 << 20)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    st = os.stat(out)
    assert st.st_size == 16 << 20
    assert st.st_blocks * 512 <= 1 << 20  # three 4 KiB blocks of data, not 16 MiB
    data = out.read_bytes()
    assert data[:B] == b"\x11" * B and data[-B:] == b"\x22" * B
    assert data[1000 * B:1001 * B] == b"\x33" * B
    assert data.count(0) == len(data) - 3 * B


def test_flatten_refuses_existing_output_and_keeps_it(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 8 * B)
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, {}, len(data))
    out = tmp_path / "flat.img"
    out.write_bytes(b"keep me")
    with pytest.raises(CowFormatError) as ei:
        cf.flatten(origin, cow, out)
    assert (ei.value.op, os.fspath(ei.value.obj)) == ("flatten", str(out)), ei.value
    assert out.read_bytes() == b"keep me"


def test_flatten_removes_output_on_failure(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 4 << 20)
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, {5: b"x" * B}, len(data))
    out = tmp_path / "flat.img"

    def boom(done: int, total: int) -> None:
        if done > 1 << 20:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cf.flatten(origin, cow, out, progress=boom)
    assert not out.exists()


def test_flatten_refuses_invalid_snapshot(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 8 * B)
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, {1: b"y" * B}, len(data))
    poke(cow, 4, struct.pack("<I", 0))
    rep = cf.inspect(cow, len(data))
    assert rep.status == "Invalid" and "invalid" in rep.codes() and not rep.ok
    assert rep.record_count == 1  # the records are still readable
    out = tmp_path / "flat.img"
    with pytest.raises(SnapshotInvalid) as ei:
        cf.flatten(origin, cow, out)
    assert os.fspath(ei.value.obj) == str(cow), ei.value
    assert isinstance(ei.value, CowdiskError)
    assert not out.exists()
    with pytest.raises(CowdiskError):
        cf.changed_ranges(cow)


# -- checks ------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Path, int]:
    """A 300-record COW (areas 0 and 1) over a 400-chunk origin."""
    origin, data = make_origin(tmp_path, 400 * B)
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, {x: chunk_data(x, 1) for x in range(300)}, len(data))
    assert cf.inspect(cow, len(data)).problems == []
    return origin, cow, len(data)


def set_record(cow: Path, k: int, old: int, new: int) -> None:
    poke(cow, record_at(k), struct.pack("<QQ", old, new))


def assert_refused(tmp_path: Path, origin: Path, cow: Path, code: str) -> None:
    rep = cf.inspect(cow, os.path.getsize(origin))
    assert code in rep.codes(), rep.summary()
    assert not rep.ok
    with pytest.raises((CowFormatError, SnapshotInvalid)) as ei:
        cf.flatten(origin, cow, tmp_path / "flat.img")
    assert os.fspath(ei.value.obj) == str(cow), ei.value
    assert not (tmp_path / "flat.img").exists()


@pytest.mark.parametrize("k,old,new,code", [
    (10, 20, 12, "duplicate-old-chunk"),          # chunk 20 is also record 20's
    (10, 10, 13, "duplicate-new-chunk"),          # COW chunk 13 is record 11's
    (10, 10, 258, "new-chunk-in-metadata"),       # area 1's slot
    (10, 10, 1, "new-chunk-in-header"),
    (10, 10, 400, "new-chunk-past-eof"),
    (10, 10, 1 << 56, "new-chunk-too-large"),
    (10, 400, 12, "old-chunk-past-origin"),
    (290, 290, 10_000, "new-chunk-past-eof"),     # in area 1
])
def test_record_problems(tmp_path: Path, good: tuple[Path, Path, int], k: int, old: int, new: int,
                         code: str) -> None:
    origin, cow, _ = good
    set_record(cow, k, old, new)
    assert_refused(tmp_path, origin, cow, code)


def test_irregular_allocation_is_a_warning(tmp_path: Path, good: tuple[Path, Path, int]) -> None:
    origin, cow, size = good
    # swap two records' data chunks: still consistent, just not the kernel's order
    set_record(cow, 0, 0, 3)
    set_record(cow, 1, 1, 2)
    rep = cf.inspect(cow, size)
    assert rep.ok and rep.codes() == {"irregular-allocation"}
    out = flat(tmp_path, origin, cow)
    raw = cow.read_bytes()
    assert out[:B] == raw[3 * B:4 * B] and out[B:2 * B] == raw[2 * B:3 * B]


def test_stale_records_after_terminator(tmp_path: Path, good: tuple[Path, Path, int]) -> None:
    origin, cow, size = good
    # area 1 holds records 256..299; put a leftover after its terminator (index 44)
    set_record(cow, 256 + 50, 7, 999)
    rep = cf.inspect(cow, size)
    assert "stale-record" in rep.codes()
    assert rep.record_count == 300  # ignored, like the kernel
    assert [p.severity for p in rep.problems if p.code == "stale-record"] == ["warning"]


def test_records_after_terminator_in_area0_are_ignored(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 64 * B)
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, {x: chunk_data(x, 1) for x in range(4)}, len(data))
    set_record(cow, 2, 0, 0)  # terminator at index 2, records 3 is now stale
    assert cf.exceptions(cow) == [(0, 2), (1, 3)]
    rep = cf.inspect(cow, len(data))
    assert "stale-record" in rep.codes() and rep.ok


def test_header_problems(tmp_path: Path, good: tuple[Path, Path, int]) -> None:
    origin, cow, size = good
    original = cow.read_bytes()[:16]
    for field_off, value, code in [(0, 0x12345678, "bad-magic"), (8, 2, "bad-version"),
                                   (12, 12, "bad-chunk-size"), (12, 0, "bad-chunk-size")]:
        poke(cow, 0, original)
        poke(cow, field_off, struct.pack("<I", value))
        assert_refused(tmp_path, origin, cow, code)
        assert cf.inspect(cow, size).status == "(load fails)"
        with pytest.raises(CowFormatError) as ei:
            cf.exceptions(cow)
        assert os.fspath(ei.value.obj) == str(cow), ei.value
    poke(cow, 0, original)
    assert cf.inspect(cow, size).ok


def test_chunk_size_mismatch_warns(tmp_path: Path, good: tuple[Path, Path, int]) -> None:
    _, cow, size = good
    rep = cf.inspect(cow, size, chunk_sectors=16)
    assert rep.ok and rep.codes() == {"chunk-size-mismatch"}
    assert rep.header.chunk_size == 8


def test_truncated_cow(tmp_path: Path) -> None:
    origin, data = make_origin(tmp_path, 300 * B)
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, {x: chunk_data(x, 1) for x in range(256)}, len(data))
    os.truncate(cow, AREA1)  # area 0 full, area 1 missing
    with pytest.raises(CowFormatError, match="truncated") as ei:  # the message is the diagnosis
        cf.exceptions(cow)
    assert os.fspath(ei.value.obj) == str(cow), ei.value
    rep = cf.inspect(cow, len(data))
    assert "truncated" in rep.codes() and rep.status == "(load fails)"
    assert_refused(tmp_path, origin, cow, "truncated")
