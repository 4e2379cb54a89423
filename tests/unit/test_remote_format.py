"""The chunked template format and the remote config, without a bucket: the manifest is
canonical and named by its digest, anything that does not hash to its name is EIO, holes
and zero chunks are not stored, and a config file others can read is refused."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from cowdisk.errors import InvalidArgument, NotFound, RemoteError
from cowdisk.remote import check_source, config, split_manifest_url
from cowdisk.remote.chunks import Manifest, compress, decode, read_chunks

K = 64 << 10


def test_manifest_round_trip_and_checks() -> None:
    m = Manifest("a" * 64, 3 * K + 512, K, ("b" * 64, None, "b" * 64, "c" * 64))
    data = m.to_bytes()
    assert Manifest.from_bytes(data, m.digest) == m
    assert m.digest == hashlib.sha256(data).hexdigest()
    assert (m.length(3), m.stored()) == (512, {"b" * 64, "c" * 64})
    with pytest.raises(RemoteError) as e:
        Manifest.from_bytes(data.replace(b"bbbb", b"bbbc", 1), m.digest)
    assert e.value.errno == errno.EIO and m.digest in str(e.value)
    bad = Manifest("a" * 64, 3 * K + 512, K, ("b" * 64, None))  # too few chunks for its size
    with pytest.raises(RemoteError, match="2 chunks"):
        Manifest.from_bytes(bad.to_bytes(), bad.digest)


def test_chunk_decode_checks_digest_and_length() -> None:
    data = os.urandom(K)
    name = hashlib.sha256(data).hexdigest()
    assert decode(compress(data), name, K, "x") == data
    for blob, length, why in ((compress(os.urandom(K)), K, "SHA-256"), (compress(data), K - 1, "bytes, expected"),
                              (b"garbage", K, "does not decompress"), (compress(data[:-1]), K, "bytes, expected")):
        with pytest.raises(RemoteError, match=why) as e:
            decode(blob, name, length, "s3://b/chunks/x")
        assert e.value.errno == errno.EIO and "s3://b/chunks/x" in str(e.value)


def test_read_chunks_skips_holes_and_zeros(tmp_path) -> None:
    p = tmp_path / "img"
    d = os.urandom(100)
    with open(p, "wb") as f:
        f.truncate(4 * K + 4096)
        f.seek(K + 7)
        f.write(d)
        f.seek(2 * K)
        f.write(bytes(K))  # written zeros
        f.seek(4 * K)
        f.write(b"x" * 4096)  # a short last chunk
    fd = os.open(p, os.O_RDONLY)
    try:
        got = list(read_chunks(fd, 4 * K + 4096, K))
    finally:
        os.close(fd)
    assert [i for i, c in got if c is not None] == [1, 4]
    assert got[1][1] == bytes(7) + d + bytes(K - 107) and got[4][1] == b"x" * 4096


def test_config_refused_when_others_can_read_it(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(config.ENV, raising=False)
    p = tmp_path / "remote.toml"
    p.write_text('[remote]\nendpoint = "http://127.0.0.1:1"\naccess_key = "k"\nsecret_key = "s"\n'
                 'bucket = "b"\nprefix = "/p/q/"\n')
    os.chmod(p, 0o640)
    with pytest.raises(InvalidArgument, match="0640") as e:
        config.load(str(tmp_path))
    assert str(p) in str(e.value)
    os.chmod(p, 0o600)
    c = config.load(str(tmp_path))
    assert (c.bucket, c.prefix, c.key("chunks", "x"), c.location()) == ("b", "p/q", "p/q/chunks/x", "s3://b/p/q")
    assert c.at("s3://other/z").location() == "s3://other/z"
    assert "secret" not in repr(c)
    p.write_text('[remote]\nendpoint = "http://x"\naccess_key = "k"\nsecret_key = "s"\nbucket = "b"\nbuckt = "c"\n')
    with pytest.raises(InvalidArgument, match="unknown keys buckt"):
        config.load(str(tmp_path))
    p.write_text('[remote]\nendpoint = "http://x"\naccess_key = "k"\nsecret_key = "s"\nbucket = "b"\n'
                 'chunk_size = 1000\n')
    with pytest.raises(InvalidArgument, match="power of two"):
        config.load(str(tmp_path))
    os.unlink(p)
    if not os.path.exists(config.SYSTEM_FILE):
        with pytest.raises(NotFound, match="no remote config"):
            config.load(str(tmp_path))


def test_locations_and_manifest_urls() -> None:
    assert config.parse_location("s3://bkt") == ("bkt", "")
    assert split_manifest_url("s3://bkt/p/manifests/" + "ab" * 32) == ("s3://bkt/p", "ab" * 32)
    assert split_manifest_url("abcdef12") is None
    for bad in ("http://bkt", "s3://", "s3://b/../x", "s3://b_c", "s3://b\u00e9", "s3://b/p\nq", "s3://b/p q",
                "s3://b/p\0", "s3://" + "b" * 64, "s3://b/" + "p" * 513):  # a request's field is hostile
        with pytest.raises(InvalidArgument):
            config.parse_location(bad)
    assert config.parse_location("s3://b-1.x/p_q/r-s.t/") == ("b-1.x", "p_q/r-s.t")
    for bad in ("s3://bkt/p/manifests/abc", "s3://bkt/p/manifests/" + "g" * 64,
                "s3://bkt/p/manifests/" + "../" * 21 + "a"):
        with pytest.raises(InvalidArgument, match="not the URL of a manifest"):
            split_manifest_url(bad)
    assert check_source("sha256:" + "ab" * 32) and check_source("ABCDEF12")
    for bad in ("abc", "12345678;rm", "s3://bkt/x", "g" * 8, "1" * 65):
        with pytest.raises(InvalidArgument):
            check_source(bad)


def test_record_skips_a_torn_or_damaged_entry() -> None:
    """A kill inside an append leaves a partial last entry; a flipped byte fails the CRC:
    neither lists a chunk. The order is the fetch order, each chunk once."""
    from cowdisk.remote.cache import _entry, parse_record, record_order

    data = _entry(5) + _entry(2) + _entry(5) + _entry(9)[:5]
    assert record_order(data) == [5, 2] and parse_record(data) == {2, 5}
    bad = bytearray(_entry(7))
    bad[0] ^= 1
    assert parse_record(bytes(bad) + _entry(3)) == {3}
