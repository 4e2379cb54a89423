#!/bin/sh
# Installs everything cowdisk, its tests, its kernel lab and its benchmarks need on a
# Debian machine (run as root). Safe to run again.
set -eu
cd "$(dirname "$0")"
PKGS="qemu-system-x86 busybox-static kmod cpio e2fsprogs xfsprogs btrfs-progs util-linux dmsetup thin-provisioning-tools fio curl golang-go strace"
# a stock Debian has no pip for its python3
python3 -m pip --version >/dev/null 2>&1 || PKGS="$PKGS python3-pip"
# container images -> templates: skopeo reads OCI layouts/archives and docker-save archives, umoci unpacks
PKGS="$PKGS skopeo umoci"
# the rbd backend and its tests: a single-node Ceph cluster (lab/ceph_cluster.py), librbd's
# Python bindings, QEMU's rbd driver (qemu-block-extra) and its FUSE export (qemu-storage-daemon)
PKGS="$PKGS ceph-mon ceph-mgr ceph-osd ceph-common python3-rados python3-rbd qemu-block-extra qemu-system-common"
# templates on demand (docs/remote.md): Ceph's own S3 endpoint (the RADOS Gateway) for the
# tests and the demo; nbdkit with its Python plugin serves lazy templates (its embedded
# Python is Debian's, hence Debian's zstandard and boto3 beside the pip ones)
PKGS="$PKGS radosgw nbdkit nbdkit-plugin-python python3-zstandard python3-boto3"
# a QEMU guest over a lazy template: its qcow2 overlay is made by qemu-img (docs/remote.md)
PKGS="$PKGS qemu-utils"
# the shells whose completion docs/cli.md shows (tests/host/test_doc_examples.py loads it in each)
PKGS="$PKGS zsh fish"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Debian's own python3 is "externally managed" (PEP 668): pip then installs into
# /usr/local (the place Debian leaves to the admin) only when told so explicitly.
flags=""
if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    flags="--break-system-packages"
fi
python3 -m pip install -q --disable-pip-version-check $flags -e '.[test]'
