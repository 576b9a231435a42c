"""Jobs that fork, and jobs that break their process's descriptors, for the drills of
tests/test_descendants.py. Each run records a line in the ledger (worker_options)."""

import os
import signal
import time

from poison.jobs import record  # one O_APPEND write per ledger line

from gdriver import Worker, job


class Descendants(Worker):
    prefix = "descendants."
    ledger = "/dev/null"  # set with worker_options

    @job(min_processes=1, max_processes=1, timeout=1)
    def run(self, job, workload):
        """``fork``: a child that outlives the job; ``daemon``: a detached grandchild (double
        fork and setsid); ``copy``: a fork that returns from the job too; ``hang``: blocks
        its timeout's signals the first time; ``closefds`` / ``devnull``: close every
        descriptor / put /dev/null over them; anything else is echoed."""
        text = workload.decode()
        ledger = self.ledger
        record(ledger, f"run {text} {os.getpid()}")
        if text == "fork":
            if os.fork() == 0:
                record(ledger, f"fork {os.getpid()}")
                time.sleep(60)
                os._exit(0)
        elif text == "daemon":
            pid = os.fork()
            if pid == 0:
                os.setsid()
                if os.fork() == 0:
                    record(ledger, f"daemon {os.getpid()}")
                    time.sleep(60)
                    os._exit(0)
                os._exit(0)
            os.waitpid(pid, 0)
        elif text == "copy":
            if os.fork() == 0:
                record(ledger, f"copy {os.getpid()}")
        elif text == "hang" and not os.path.exists(ledger + ".hung"):
            record(ledger + ".hung", "")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
            time.sleep(30)  # until the supervisor's SIGKILL
        elif text == "closefds":
            os.closerange(0, 4096)
        elif text == "devnull":
            null = os.open(os.devnull, os.O_RDWR)
            for fd in range(64):
                if fd != null and os.path.exists(f"/proc/self/fd/{fd}"):
                    os.dup2(null, fd)
        return workload
