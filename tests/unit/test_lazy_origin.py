"""dm-thin's rule for a lazy template as external origin (backends/dm_common.py
check_lazy_size): its size must be a multiple of the pool's block, else the create is
refused naming the template, both sizes and the way out. The kernel side is in the lab
(tests/lab/test_lazy_volume_dm.py)."""

from __future__ import annotations

import pytest

from cowdisk.backends import TemplateRef, VolumeCtx
from cowdisk.backends.dm_common import check_lazy_size
from cowdisk.errors import Unsupported

MiB = 1 << 20


def ctx(size: int) -> VolumeCtx:
    return VolumeCtx(id="v", template=TemplateRef("0123456789abcdef", "/x/disk.lazy", size, serve=lambda: "/s"),
                     data_dir="/x", tag="cowdisk:s", dm_name="cowdisk-s-v")


def test_a_lazy_template_must_be_whole_pool_blocks() -> None:
    check_lazy_size(ctx(4 * MiB), 256 << 10, "dm-thin")
    with pytest.raises(Unsupported) as e:
        check_lazy_size(ctx(4 * MiB + (64 << 10)), 256 << 10, "dm-thin")
    assert "lazy template 0123456789abcdef is 4259840 bytes" in str(e.value)
    assert "block size (262144 bytes)" in str(e.value) and "without --lazy" in (e.value.hint or "")

