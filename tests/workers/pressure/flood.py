"""A job that prints 100-byte lines to stdout as fast as it can for a while."""

import sys
import time

from gdriver import Worker, job

LINE = "flood " + "z" * 93 + "\n"
BLOCK = LINE * 1000  # written at once: the pipe refills as fast as it is read


class Flood(Worker):
    @job(min_processes=1, max_processes=1)
    def flood(self, job, workload):
        """Prints for ``workload`` seconds; returns how many lines it printed."""
        end = time.monotonic() + float(workload)
        n = 0
        while time.monotonic() < end:
            sys.stdout.write(BLOCK)
            n += 1000
        sys.stdout.flush()
        return str(n)
