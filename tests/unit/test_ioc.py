"""ioctl numbers computed by cowdisk.kernel.ioc equal the UAPI headers' values.

The expected numbers are what the C macros give on x86-64 (and every architecture
with the generic layout), written out as literals, never recomputed here.
"""

from __future__ import annotations

import struct

import pytest

from cowdisk.kernel import blk, dm_abi, fs, ioc, loop

pytestmark = pytest.mark.skipif(ioc.SIZEBITS != 14, reason="golden values are for the generic ioctl layout")


def test_macros() -> None:
    assert ioc.IO(0x12, 97) == 0x1261
    assert ioc.IOR(ord("f"), 1, 8) == 0x80086601
    assert ioc.IOW(0x94, 9, 4) == 0x40049409
    assert ioc.IOWR(0xFD, 0, 312) == 0xC138FD00
    assert ioc.IOWR(0xFD, 0, struct.Struct("=312x")) == 0xC138FD00  # a Struct counts by its size


@pytest.mark.parametrize("bad", [(0x100, 0, 0), (0, 0x100, 0), (0, 0, 1 << 14), (0, 0, -1)])
def test_out_of_range(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        ioc.IOWR(*bad)


def test_fs_numbers() -> None:
    assert fs.FICLONE == 0x40049409
    assert fs.FS_IOC_FIEMAP == 0xC020660B
    assert fs.FS_IOC_GETFLAGS == 0x80086601
    assert fs.FS_IOC_SETFLAGS == 0x40086602


def test_loop_numbers() -> None:
    assert loop.LOOP_SET_FD == 0x4C00
    assert loop.LOOP_CLR_FD == 0x4C01
    assert loop.LOOP_SET_STATUS64 == 0x4C04
    assert loop.LOOP_GET_STATUS64 == 0x4C05
    assert loop.LOOP_SET_CAPACITY == 0x4C07
    assert loop.LOOP_SET_DIRECT_IO == 0x4C08
    assert loop.LOOP_SET_BLOCK_SIZE == 0x4C09
    assert loop.LOOP_CONFIGURE == 0x4C0A
    assert loop.LOOP_CTL_ADD == 0x4C80
    assert loop.LOOP_CTL_REMOVE == 0x4C81
    assert loop.LOOP_CTL_GET_FREE == 0x4C82


def test_blk_numbers() -> None:
    assert blk.BLKGETSIZE64 == 0x80081272
    assert blk.BLKSSZGET == 0x1268
    assert blk.BLKFLSBUF == 0x1261


def test_dm_numbers() -> None:
    assert dm_abi.DM_VERSION == 0xC138FD00
    assert dm_abi.DM_REMOVE_ALL == 0xC138FD01
    assert dm_abi.DM_LIST_DEVICES == 0xC138FD02
    assert dm_abi.DM_DEV_CREATE == 0xC138FD03
    assert dm_abi.DM_DEV_REMOVE == 0xC138FD04
    assert dm_abi.DM_DEV_RENAME == 0xC138FD05
    assert dm_abi.DM_DEV_SUSPEND == 0xC138FD06
    assert dm_abi.DM_DEV_STATUS == 0xC138FD07
    assert dm_abi.DM_DEV_WAIT == 0xC138FD08
    assert dm_abi.DM_TABLE_LOAD == 0xC138FD09
    assert dm_abi.DM_TABLE_CLEAR == 0xC138FD0A
    assert dm_abi.DM_TABLE_DEPS == 0xC138FD0B
    assert dm_abi.DM_TABLE_STATUS == 0xC138FD0C
    assert dm_abi.DM_LIST_VERSIONS == 0xC138FD0D
    assert dm_abi.DM_TARGET_MSG == 0xC138FD0E
    assert dm_abi.DM_DEV_SET_GEOMETRY == 0xC138FD0F
    assert dm_abi.DM_DEV_ARM_POLL == 0xC138FD10
    assert dm_abi.DM_GET_TARGET_VERSION == 0xC138FD11


def test_layout_table() -> None:
    assert ioc._layout("x86_64") == (14, 2, 0, 1, 2)
    assert ioc._layout("ppc64le") == (13, 3, 1, 4, 2)
    with pytest.raises(ImportError):
        ioc._layout("vax")
