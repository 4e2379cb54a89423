"""Byte-exact packing and parsing of cowdisk.kernel.dm_abi and dm_status, no kernel needed.

Golden bytes come from docs/reference/device-mapper.md (printed by C against the UAPI
header); output buffers are built here by hand, field by field, the way the kernel
lays them out, not with dm_abi.py's own Structs.
"""

from __future__ import annotations

import errno
import os

import pytest

from cowdisk.errors import InvalidArgument, KernelError
from cowdisk.kernel import dm, dm_status
from cowdisk.kernel import dm_abi as abi


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def _u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


def _pad8(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


# -- layout and numbers ---------------------------------------------------


def test_struct_sizes() -> None:
    assert abi.dm_ioctl.size == 312
    assert abi.dm_target_spec.size == 40
    assert abi.dm_name_list.size == 12
    assert abi.dm_target_versions.size == 16
    assert abi.dm_target_msg.size == 8


def test_ioctl_numbers() -> None:
    assert abi.DM_VERSION == 0xC138FD00
    assert abi.DM_LIST_DEVICES == 0xC138FD02
    assert abi.DM_DEV_CREATE == 0xC138FD03
    assert abi.DM_DEV_REMOVE == 0xC138FD04
    assert abi.DM_DEV_SUSPEND == 0xC138FD06
    assert abi.DM_DEV_STATUS == 0xC138FD07
    assert abi.DM_TABLE_LOAD == 0xC138FD09
    assert abi.DM_TABLE_STATUS == 0xC138FD0C
    assert abi.DM_LIST_VERSIONS == 0xC138FD0D
    assert abi.DM_TARGET_MSG == 0xC138FD0E
    assert abi.DM_GET_TARGET_VERSION == 0xC138FD11


def test_flag_values() -> None:
    assert (abi.DM_READONLY_FLAG, abi.DM_SUSPEND_FLAG, abi.DM_STATUS_TABLE_FLAG) == (0x1, 0x2, 0x10)
    assert (abi.DM_ACTIVE_PRESENT_FLAG, abi.DM_INACTIVE_PRESENT_FLAG, abi.DM_BUFFER_FULL_FLAG) == (0x20, 0x40, 0x100)
    assert (abi.DM_SKIP_LOCKFS_FLAG, abi.DM_NOFLUSH_FLAG, abi.DM_UUID_FLAG) == (0x400, 0x800, 0x4000)
    assert (abi.DM_DATA_OUT_FLAG, abi.DM_DEFERRED_REMOVE) == (0x10000, 0x20000)


# -- section 7 worked example ---------------------------------------------

# The exact 384-byte buffer of docs/reference/device-mapper.md section 7, written out from its table.
_WORKED = (
    _u32(4) + _u32(0) + _u32(0)  # version 4.0.0
    + _u32(384)  # data_size
    + _u32(312)  # data_start
    + _u32(1)  # target_count
    + bytes(16)  # open_count, flags, event_nr, padding
    + _u64(0)  # dev
    + b"cow-vm1".ljust(128, b"\0")  # name
    + bytes(129)  # uuid
    + bytes(7)  # data padding
    + _u64(0)  # spec.sector_start
    + _u64(2097152)  # spec.length
    + _u32(0)  # spec.status
    + _u32(72)  # spec.next
    + b"snapshot".ljust(16, b"\0")
    + b"/dev/loop0 /dev/loop1 P 8\0"
    + bytes(6)
)


def test_worked_example_is_384_bytes_as_printed() -> None:
    assert len(_WORKED) == 384
    # The non-zero rows the C check printed.
    assert _WORKED[0x000:0x010] == bytes.fromhex("04000000 00000000 00000000 80010000")
    assert _WORKED[0x010:0x018] == bytes.fromhex("38010000 01000000")
    assert _WORKED[0x030:0x038] == b"cow-vm1\0"
    assert _WORKED[0x140:0x150] == bytes.fromhex("00002000 00000000 00000000 48000000")
    assert _WORKED[0x150:0x159] == b"snapshot\0"
    assert _WORKED[0x160:0x17A] == b"/dev/loop0 /dev/loop1 P 8\0"


def test_pack_table_load_matches_worked_example() -> None:
    t = abi.Target(0, 2097152, "snapshot", "/dev/loop0 /dev/loop1 P 8")
    buf = abi.pack_table_load(b"cow-vm1", [t])
    assert bytes(buf) == _WORKED


def test_pack_table_load_readonly_sets_flag_only() -> None:
    t = abi.Target(0, 2097152, "snapshot", "/dev/loop0 /dev/loop1 P 8")
    buf = abi.pack_table_load(b"cow-vm1", [t], abi.DM_READONLY_FLAG)
    expected = bytearray(_WORKED)
    expected[28:32] = _u32(1)
    assert bytes(buf) == bytes(expected)


def test_pack_table_load_two_targets_next_is_relative_to_each_spec() -> None:
    targets = [abi.Target(0, 8, "linear", "7:0 0"), abi.Target(8, 16, "zero", "")]
    buf = abi.pack_table_load(b"two", targets)
    first = 40 + len(b"7:0 0") + 1  # 46 -> 48
    second = 40 + 1  # 41 -> 48
    assert len(buf) == 312 + 48 + 48
    assert buf[12:24] == _u32(len(buf)) + _u32(312) + _u32(2)
    spec1 = _u64(0) + _u64(8) + _u32(0) + _u32(48) + b"linear".ljust(16, b"\0") + b"7:0 0\0"
    spec2 = _u64(8) + _u64(16) + _u32(0) + _u32(48) + b"zero".ljust(16, b"\0") + b"\0"
    assert bytes(buf[312:]) == _pad8(spec1) + _pad8(spec2)
    assert first <= 48 and second <= 48
    # every spec sits 8-aligned from byte 0 of the header
    assert 312 % 8 == 0 and (312 + 48) % 8 == 0


def test_pack_table_load_rejects_empty_and_bad_targets() -> None:
    with pytest.raises(InvalidArgument):
        abi.pack_table_load(b"x", [])
    with pytest.raises(InvalidArgument):
        abi.pack_table_load(b"x", [abi.Target(0, 8, "a-type-name-too-long", "")])
    with pytest.raises(InvalidArgument):
        abi.pack_table_load(b"x", [abi.Target(0, 0, "zero", "")])
    with pytest.raises(InvalidArgument):
        abi.pack_table_load(b"x", [abi.Target(0, 8, "linear", "7:0\x000")])


def test_pack_header_only_buffer() -> None:
    buf = abi.pack_dm_ioctl(name=b"vol", flags=abi.DM_SUSPEND_FLAG | abi.DM_NOFLUSH_FLAG)
    assert len(buf) == 312
    assert buf[:24] == _u32(4) + _u32(0) + _u32(0) + _u32(312) + _u32(312) + _u32(0)
    assert buf[28:32] == _u32(0x802)
    assert buf[48:52] == b"vol\0"
    assert buf[176:] == bytes(136)


def test_pack_target_msg() -> None:
    buf = abi.pack_target_msg(b"pool", 0, "create_thin 7", 512)
    assert len(buf) == 512
    assert buf[:12] == _u32(4) + _u32(2) + _u32(0)  # TARGET_MSG needs 4.2.0
    assert buf[12:20] == _u32(512) + _u32(312)
    assert buf[312:320] == _u64(0)
    assert buf[320:334] == b"create_thin 7\0"


def test_parse_header_decodes_huge_dev_and_flags() -> None:
    buf = bytearray(312)
    buf[0:12] = _u32(4) + _u32(47) + _u32(0)
    buf[20:24] = _u32(1)  # target_count
    buf[24:28] = (2).to_bytes(4, "little", signed=True)
    buf[28:32] = _u32(abi.DM_ACTIVE_PRESENT_FLAG | abi.DM_READONLY_FLAG)
    buf[32:36] = _u32(5)
    buf[40:48] = _u64(0x10FC00)  # 252:256 in the kernel's encoding (docs/reference/device-mapper.md section 5)
    buf[48:53] = b"vol1\0"
    buf[176:180] = b"abc\0"
    info = abi.parse_dm_ioctl(buf)
    assert (info.name, info.uuid, info.major, info.minor) == ("vol1", "abc", 252, 256)
    assert (info.open_count, info.event_nr, info.target_count, info.version) == (2, 5, 1, (4, 47, 0))
    assert info.active_table and info.readonly and not info.suspended and not info.inactive_table
    assert info.node == "/dev/dm-256" and info.devno == "252:256"
    assert info.dev == os.makedev(252, 256)


def test_dev_decode_matches_c_values() -> None:
    assert abi.decode_dev(0xFD03) == (253, 3)
    assert abi.decode_dev(0x10FC00) == (252, 256)
    assert abi.decode_dev(0xFFF0FEFF) == (254, 1048575)


# -- output buffers built by hand -----------------------------------------


def _name_record(dev: int, name: bytes, event_nr: int, flags: int, uuid: bytes | None, last: bool) -> bytes:
    head = _u64(dev) + b"\0\0\0\0" + name + b"\0"
    head = _pad8(head)  # event_nr/flags at the next 8-aligned offset from the record start
    rec = head + _u32(event_nr) + _u32(flags)
    if uuid is not None:
        rec += uuid + b"\0"
    rec = _pad8(rec)
    nxt = 0 if last else len(rec)
    return rec[:8] + _u32(nxt) + rec[12:]


def test_parse_name_list_matches_reference_offsets() -> None:
    rec = _name_record(0xFD00, b"vol1", 3, abi.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID, None, last=False)
    # docs/reference/device-mapper.md section 3: name "vol1" at 12-16, event_nr @24, flags @28, next @32.
    assert rec[12:17] == b"vol1\0" and rec[24:28] == _u32(3) and len(rec) == 32


def test_parse_name_list_hand_built() -> None:
    r1 = _name_record(0xFD00, b"vol1", 3, abi.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID, None, last=False)
    r2 = _name_record(0x10FC00, b"a-much-longer-name", 9, abi.DM_NAME_LIST_FLAG_HAS_UUID, b"CDSK-1234", last=True)
    payload = r1 + r2
    buf = bytearray(312) + payload + bytes(64)
    out = abi.parse_name_list(buf, 312, 312 + len(payload), (4, 47, 0))
    assert out == [
        abi.DeviceName("vol1", 253, 0, "", 3),
        abi.DeviceName("a-much-longer-name", 252, 256, "CDSK-1234", 9),
    ]


def test_parse_name_list_empty() -> None:
    assert abi.parse_name_list(bytearray(400), 312, 312) == []


def test_parse_name_list_old_kernel_has_no_tail() -> None:
    rec = _u64(0xFD01) + _u32(0) + b"old\0"
    buf = bytearray(312) + rec + bytes(16)
    out = abi.parse_name_list(buf, 312, 312 + len(rec), (4, 27, 0))
    assert out == [abi.DeviceName("old", 253, 1, None, None)]


def test_parse_target_specs_next_is_relative_to_data_start() -> None:
    s1 = _pad8(_u64(0) + _u64(8) + _u32(0) + _u32(0) + b"linear".ljust(16, b"\0") + b"7:0 0\0")
    s2 = _pad8(_u64(8) + _u64(2048) + _u32(0) + _u32(0) + b"snapshot".ljust(16, b"\0") + b"16/131072 16\0")
    s1 = s1[:20] + _u32(len(s1)) + s1[24:]  # output: offset of spec 2 from data_start
    s2 = s2[:20] + _u32(len(s1) + len(s2)) + s2[24:]
    payload = s1 + s2
    buf = bytearray(312) + payload
    out = abi.parse_target_specs(buf, 312, 2, len(buf))
    assert out == [
        abi.TargetLine(0, 8, "linear", "7:0 0"),
        abi.TargetLine(8, 2048, "snapshot", "16/131072 16"),
    ]


def test_parse_target_specs_empty_text() -> None:
    s = _pad8(_u64(0) + _u64(8) + _u32(0) + _u32(48) + b"zero".ljust(16, b"\0") + b"\0")
    buf = bytearray(312) + s
    assert abi.parse_target_specs(buf, 312, 1, len(buf)) == [abi.TargetLine(0, 8, "zero", "")]


def test_parse_target_specs_truncated_raises() -> None:
    buf = bytearray(312) + bytes(20)
    with pytest.raises(ValueError):
        abi.parse_target_specs(buf, 312, 1, len(buf))


def test_parse_target_versions_hand_built() -> None:
    r1 = _pad8(_u32(0) + _u32(1) + _u32(4) + _u32(0) + b"striped\0")
    r2 = _pad8(_u32(0) + _u32(1) + _u32(22) + _u32(0) + b"thin-pool\0")
    r1 = _u32(len(r1)) + r1[4:]
    payload = r1 + r2
    buf = bytearray(312) + payload
    assert abi.parse_target_versions(buf, 312, len(buf)) == {"striped": (1, 4, 0), "thin-pool": (1, 22, 0)}


# -- status lines ---------------------------------------------------------


def test_snapshot_status_valid() -> None:
    s = dm_status.parse_snapshot_status("16/131072 16")
    assert s == dm_status.SnapshotStatus("valid", 16, 131072, 16)
    assert s.valid and s.data_sectors == 0
    assert dm_status.parse_snapshot_status("16464/16800 80").data_sectors == 16384


@pytest.mark.parametrize(
    "text, state",
    [("Invalid", "invalid"), ("Overflow", "overflow"), ("Merge failed", "merge_failed"), ("Unknown", "unknown")],
)
def test_snapshot_status_words(text: str, state: str) -> None:
    s = dm_status.parse_snapshot_status(text)
    assert s.state == state and not s.valid
    assert s.allocated_sectors is None and s.data_sectors is None


@pytest.mark.parametrize("text", ["", "16/131072", "a/b c", "16 131072 16", "invalid"])
def test_snapshot_status_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        dm_status.parse_snapshot_status(text)


def test_thin_pool_status_full() -> None:
    s = dm_status.parse_thin_pool_status(
        "0 10/512 0/1024 - rw discard_passdown queue_if_no_space - 384 "
    )
    assert s == dm_status.ThinPoolStatus(
        "ok", 0, 10, 512, 0, 1024, None, "rw", "discard_passdown", "queue_if_no_space", False, 384
    )


def test_thin_pool_status_variants() -> None:
    s = dm_status.parse_thin_pool_status("7 99/512 1024/1024 33 out_of_data_space ignore_discard error_if_no_space needs_check")
    assert (s.transaction_id, s.held_metadata_root, s.mode, s.needs_check) == (7, 33, "out_of_data_space", True)
    assert s.metadata_low_watermark is None
    assert dm_status.parse_thin_pool_status("Fail").state == "fail"
    assert dm_status.parse_thin_pool_status("Error").state == "error"
    with pytest.raises(ValueError):
        dm_status.parse_thin_pool_status("0 10/512 0/1024 - rw bogus queue_if_no_space -")
    with pytest.raises(ValueError):
        dm_status.parse_thin_pool_status("0 10/512")


def test_thin_status() -> None:
    assert dm_status.parse_thin_status("0 -") == dm_status.ThinStatus("ok", 0, None)
    assert dm_status.parse_thin_status("2048 2047") == dm_status.ThinStatus("ok", 2048, 2047)
    assert dm_status.parse_thin_status("Fail") == dm_status.ThinStatus("fail")
    assert dm_status.parse_thin_status("-") == dm_status.ThinStatus("unknown")
    with pytest.raises(ValueError):
        dm_status.parse_thin_status("x y")


# -- names ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["vol1", "cdtest-abc_1.2:3", "a" * 127, "with space", "ü" * 63])
def test_valid_names(name: str) -> None:
    assert abi.validate_name(name) == name.encode()


@pytest.mark.parametrize("name", ["", "a" * 128, "ü" * 64, "a/b", "/", ".", "..", "control", "nul\0x"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        abi.validate_name(name)


def test_invalid_uuid() -> None:
    assert abi.validate_uuid("u" * 128) == b"u" * 128
    with pytest.raises(InvalidArgument):
        abi.validate_uuid("u" * 129)


def test_kernel_error_keeps_errno() -> None:
    e = KernelError("dm remove", "vol1", errno.ENXIO, detail="no such device (already gone)")
    assert e.errno == errno.ENXIO and dm.is_gone(e)
    assert str(e).startswith("dm remove vol1: ENXIO")
    assert isinstance(e, OSError)


def test_target_line() -> None:
    assert abi.Target(0, 8, "zero", "").line() == "0 8 zero"
    assert abi.Target(0, 8, "linear", "7:0 0").line() == "0 8 linear 7:0 0"


def test_data_range_reads_size_at_12_and_start_at_16() -> None:
    buf = abi.pack_dm_ioctl(data_size=1024)
    buf[12:20] = _u32(400) + _u32(312)  # as the kernel writes back: data_size, then data_start
    assert abi.data_range(buf) == (312, 400)


def test_device_node_wants_a_device_info() -> None:
    with pytest.raises(TypeError):
        dm.device_node("vm1")  # type: ignore[arg-type]
