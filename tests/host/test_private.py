"""Private by default (suites/private.py) on copy, reflink (xfs, btrfs) and pool, on this
host's kernel; and an existing store brought to the modes when it is opened."""

import pytest

from suites.private import test_every_store_file_is_private_to_root, umask0  # noqa: F401

pytestmark = pytest.mark.root


def test_an_existing_store_is_made_private_once_and_doctor_names_wider_files(tmp_path) -> None:
    import json
    import os
    import stat

    from cowdisk import doctor
    from cowdisk.kernel import fs
    from cowdisk.store import Store, modes
    from testutil import make_tree

    root = str(tmp_path / "store")
    with Store(root, backend="copy") as s:
        t = s.build_template(make_tree(str(tmp_path / "tree")), "base")
        s.create_volume("old", "base")
    # a store as earlier versions left it: 0755 directories, 0644 files, a 0444 immutable
    # template (hard-linked from nothing: the cache gave it up), no "modes" in store.json
    img = os.path.join(root, "templates", t.id, "disk.img")
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o755)
        for n in files:
            p = os.path.join(d, n)
            if p == img:
                fs.set_immutable(p, False)
                os.chmod(p, 0o444)
                fs.set_immutable(p, True)
            else:
                os.chmod(p, 0o644)
    sj = os.path.join(root, "store.json")
    with open(sj) as f:
        doc = json.load(f)
    del doc["modes"]
    with open(sj, "w") as f:
        json.dump(doc, f)
    os.chmod(sj, 0o644)
    (check,) = doctor.mode_checks(root)
    wide = {w.path: w for w in modes.wide(root)}
    assert check.ok is False and check.detail.startswith(f"{len(wide)} wider than allowed: {root} 0755"), check
    assert stat.S_IMODE(wide[img].mode) == 0o444 and len(wide) >= 15, wide

    with Store(root) as s:  # the open brings it to the rules, once
        assert modes.wide(root) == []
        assert stat.S_IMODE(os.stat(img).st_mode) == 0o400 and fs.is_immutable(img)
        s.create_volume("new", "base")  # the template's record follows its new change time
        assert s.template(t.id).state == "ready"
    with open(sj) as f:
        assert json.load(f)["modes"] == modes.VERSION
    (check,) = doctor.mode_checks(root)
    assert check.ok is True, check
    # once only: a file widened later stays wide on the next open, and doctor names it
    widened = os.path.join(root, "templates")
    os.chmod(widened, 0o755)
    with Store(root) as s:
        (check,) = doctor.mode_checks(root)
        assert check.ok is False and check.detail == f"1 wider than allowed: {widened} 0755 (allowed 0700)", check
        s.remove_volume("new")
        s.remove_volume("old")
        s.destroy()
