"""One worker process's job loop, outside a supervisor, for counting its instructions.

    jobloop.py PORT NAMESPACE JOBS CHANNEL_FD

Runs what a forked gdriver worker process runs (``process.Child`` with its shared-memory
slot, its log routing and signal handlers, ``GearmanWorker`` on gearmand 127.0.0.1:PORT)
for the first job of NAMESPACE, until it has done JOBS jobs; the caller queued them before
and reads the channel's other end (CHANNEL_FD, a SOCK_SEQPACKET socket). Used by
``sections/instructions.py`` under ``valgrind --tool=callgrind``.

Under valgrind the process runs some 50 times slower, so the time-based flush of job
reports (``process.FLUSH_AFTER``) is stretched by as much: reports then go out in batches of
``process.FLUSH_JOBS``, as they do at full speed, whatever the machine's load.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "workers")]

from gdriver import loader, process, slots  # noqa: E402

SLOWDOWN = 100.0


def main() -> None:
    port, namespace, jobs, fd = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    spec = loader.load([namespace])[0]
    board = slots.Board(4)
    board.claim()  # the process's slot, as the supervisor hands it over at fork
    process.FLUSH_AFTER *= SLOWDOWN
    channel = socket.socket(fileno=fd)
    child = process.Child(spec, channel, jobs, 0.0)
    process.logs.setup_child(child.send_log, spec.name, logging.INFO)
    wake_fd = process._handle_signals(child, ())
    process._serve(child, [("127.0.0.1", port)], wake_fd)
    if child.jobs_done != jobs:
        raise SystemExit(f"ran {child.jobs_done} jobs of {jobs}")


if __name__ == "__main__":
    main()
