#!/bin/sh
# Installs everything cowdisk, its tests, its kernel lab and its benchmarks need on a
# Debian machine (run as root). Safe to run again.
set -eu
cd "$(dirname "$0")"
PKGS="qemu-system-x86 busybox-static kmod cpio e2fsprogs xfsprogs btrfs-progs util-linux dmsetup fio"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
