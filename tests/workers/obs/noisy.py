"""Jobs that write to stdout and stderr, log, raise and print very long lines, in three
processes at once."""

import logging
import os
import sys

from gdriver import Worker, job

log = logging.getLogger("obs.noisy")


class Noisy(Worker):
    @job(min_processes=3, max_processes=3)
    def noisy(self, job, workload):
        tag = workload.decode()
        pid = os.getpid()
        for i in range(50):
            print(f"out {tag} {pid} {i} " + "o" * 3000)
            print(f"err {tag} {pid} {i} " + "e" * 3000, file=sys.stderr)
        print(f"long {tag} {pid} " + "L" * 50_000)
        sys.stdout.buffer.write(b"bytes " + tag.encode() + b" \xff\xfe\x00 end\n")
        sys.stdout.flush()
        log.info("logged %s", tag, extra={"tag": tag})
        if tag.startswith("raise"):
            raise KeyError(f"noisy {tag}")
        return str(pid)

    @job(min_processes=1, max_processes=1)
    def biglog(self, job, workload):
        """A log record far larger than one channel message."""
        log.warning("big record", extra={"blob": "\u00e9" * 100_000})
        log.warning("x" * 200_000)
        return b"done"
