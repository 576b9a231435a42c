"""What each fork costs the supervisor when it starts hundreds of processes: the descriptors
a child closes, kept as the processes come and go, and closed in runs."""

from __future__ import annotations

import os

from gdriver.childio import ChildIO, Children
from gdriver.spawn import close_all


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_close_all_closes_exactly_the_given_descriptors() -> None:
    fds = [fd for _ in range(6) for fd in os.pipe()]
    try:
        fds.sort()
        # runs of consecutive numbers, a gap, a single one, duplicates, out of order
        doomed = [*fds[0:3], fds[5], *fds[7:10], fds[8], fds[5]]
        kept = [fd for fd in fds if fd not in doomed]
        close_all(reversed(doomed))
        assert not any(is_open(fd) for fd in doomed)
        assert all(is_open(fd) for fd in kept)
        close_all([])
    finally:
        for fd in fds:
            if is_open(fd):
                os.close(fd)


def test_children_list_every_supervisor_end_as_processes_come_and_go() -> None:
    children = Children()
    made = {pid: ChildIO() for pid in (101, 102, 103)}

    def expected() -> list[int]:
        return sorted(fd for io in children.values() for fd in io.fds())

    try:
        assert children.fds() == []
        for pid, io in made.items():
            children[pid] = io
            assert sorted(children.fds()) == expected()
        children.pop(102)
        assert sorted(children.fds()) == expected()
        children[104] = made[102]
        assert sorted(children.fds()) == expected()
        del children[101]
        assert sorted(children.fds()) == expected()
        assert children.pop(999, None) is None
        assert sorted(children.fds()) == expected() and len(children.fds()) == 6
    finally:
        for io in made.values():
            io.abort()
