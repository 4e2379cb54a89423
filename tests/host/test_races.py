"""Operations on related volumes at once. A checkpoint of the copy B (which holds the
source A's retargeted link) that has listed its links when an in-place restore of A
makes A's own link must leave that link alone. The window is microseconds wide; the
``drop-links:listed`` pause point holds B inside it while A is restored."""

from __future__ import annotations

import os
import time

import pytest

from cowdisk.store import Store
from testutil import make_tree

pytestmark = pytest.mark.root


def test_checkpoint_of_the_copy_while_the_source_is_restored(tmp_path) -> None:
    with Store(str(tmp_path / "s"), backend="copy") as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        s.create_volume("a", "base")
        s.checkpoint("a")
        s.restore("a", "b")  # a's link -> b
        pid = os.fork()
        if pid == 0:  # B's checkpoint, paused after it listed its links (a's among them)
            code = 1
            try:
                os.environ.update(COWDISK_PAUSE_AT="drop-links:listed", COWDISK_PAUSE_S="1.5")
                with Store(s.root, recover=False) as mine:
                    mine.checkpoint("b")
                code = 0
            finally:
                os._exit(code)
        time.sleep(0.5)
        s.restore("a")  # inside B's window: a's own link, made while B still lists it
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        a = s.volume("a")
        assert a.state == "attached" and os.path.realpath(a.link) == os.path.realpath(a.device)
        assert [(p, o) for p, o, _ in s.registry.links() if p == a.link] == [(a.link, "a")]
        assert s.volume("b").state == "checkpointed"
        assert s.recover().actions == 0
        s.remove_volume("b")
        s.remove_volume("a")
        s.destroy()
