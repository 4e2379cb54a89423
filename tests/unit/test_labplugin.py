"""Host-side checks of the kernel lab plumbing that need no boot."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import _labplugin as lp

KERNEL_LAB = Path(__file__).resolve().parents[2] / "lab" / "kernel_lab.py"


@pytest.fixture(scope="module")
def kl():
    return lp.load_kernel_lab()


def test_junit_roundtrip_with_real_pytest(tmp_path):
    """Outcomes read back from a real pytest junit file, matched by node id."""
    sub = tmp_path / "pkg"
    sub.mkdir()
    (sub / "test_mod.py").write_text(textwrap.dedent("""
        import pytest

        def test_ok():
            print("hello from inside")

        def test_fail():
            assert 1 == 2, "boom"

        def test_skip():
            pytest.skip("no dm here")

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert 0

        @pytest.mark.parametrize("x", ["a/b", 2])
        def test_param(x):
            assert x != 2

        class TestK:
            def test_m(self):
                pass

        @pytest.fixture
        def broken():
            raise RuntimeError("setup exploded")

        def test_setup_error(broken):
            pass
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    junit = tmp_path / "junit.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                        f"--junitxml={junit}", "-o", "junit_logging=all", "-o", "junit_family=xunit1",
                        "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), "pkg"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    res = lp.parse_junit(junit)
    m = "pkg/test_mod.py"
    expect = {
        f"{m}::test_ok": "passed",
        f"{m}::test_fail": "failed",
        f"{m}::test_skip": "skipped",
        f"{m}::test_xfail": "xfailed",
        f"{m}::test_param[a/b]": "passed",
        f"{m}::test_param[2]": "failed",
        f"{m}::TestK::test_m": "passed",
        f"{m}::test_setup_error": "failed",
        f"{m}::test_not_there": "missing",
    }
    got = {nid: lp.outcome_for(nid, res, None).outcome for nid in expect}
    assert got == expect
    assert "boom" in lp.outcome_for(f"{m}::test_fail", res, None).text
    assert "setup exploded" in lp.outcome_for(f"{m}::test_setup_error", res, None).text
    assert "no dm here" in lp.outcome_for(f"{m}::test_skip", res, None).text


def test_lab_error_wins():
    r = lp.outcome_for("tests/lab/test_x.py::test_y", None, "kernel lab failed: panic")
    assert (r.outcome, r.text) == ("laberror", "kernel lab failed: panic")


def test_lab_dir_detection():
    assert lp.LAB_DIR.name == "lab" and lp.LAB_DIR.parent.name == "tests"
    assert (lp.LAB_DIR / "test_lab_smoke.py").exists()
    assert lp.KERNEL_LAB.exists()


def test_parse_size(kl):
    assert kl.parse_size("2G") == 2 << 30
    assert kl.parse_size("512M") == 512 << 20
    assert kl.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        kl.parse_size("lots")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 100000])
def test_console_stream_markers(kl, chunk):
    """The command's output is streamed verbatim, boot noise and markers are not."""
    nonce = "00ff00ff00ff00ff"
    console = (b"SeaBIOS\r\nboot noise\r\n@@cowdisk-lab-init@@\r\n"
               b"@@cowdisk-lab-begin@@" + nonce.encode() + b"@@\r\n"
               b"line one\r\n@@cowdisk-lab-end@@wrongnonce@@1@@ partial"
               b"@@cowdisk-lab-end@@" + nonce.encode() + b"@@3@@\r\npower down\r\n")
    out = io.BytesIO()
    s = kl._Stream(nonce, out, show_boot=False)
    for i in range(0, len(console), chunk):
        s.feed(console[i:i + chunk])
    s.flush()
    assert s.state == "done" and s.marker_rc == 3 and s.init_seen
    assert out.getvalue() == b"line one\n@@cowdisk-lab-end@@wrongnonce@@1@@ partial"


def test_console_stream_no_end(kl):
    out = io.BytesIO()
    s = kl._Stream("ab", out, show_boot=False)
    s.feed(b"@@cowdisk-lab-begin@@ab@@\nrunning\nKernel panic - not syncing: x\n")
    s.flush()
    assert s.state == "run" and s.marker_rc is None
    assert out.getvalue() == b"running\nKernel panic - not syncing: x\n"


def test_job_script_quoting(kl, tmp_path):
    """The guest's job script (run here with the host's sh) keeps argv and env exact."""
    argv = [sys.executable, "-c", "import os,sys; print(repr(sys.argv[1:]), os.getcwd(), os.environ['X'])",
            "a b", "$HOME", "it's"]
    script = kl._job_script(argv, str(tmp_path), {"X": "v $y 'q'", "PATH": "/usr/bin:/bin"})
    r = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == f"{['a b', '$HOME', 'it' + chr(39) + 's']!r} {tmp_path} v $y 'q'"


def test_guest_env(kl):
    env = kl.guest_env("/tmp/cowdisk-lab-job-x/scratch")
    assert env["COWDISK_IN_LAB"] == "1"
    assert env["TMPDIR"] == env["COWDISK_LAB_SCRATCH"] == "/tmp/cowdisk-lab-job-x/scratch"
    assert env["DM_DISABLE_UDEV"] == "1"
    assert "/usr/sbin" in env["PATH"].split(":")
