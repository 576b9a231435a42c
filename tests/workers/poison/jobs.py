"""Jobs that kill their own process, so the poison drills can count the deaths."""

import ctypes
import os
import signal
import socket
import stat
import time

from drill.jobs import record  # one O_APPEND write per line

from gdriver import Worker, job


def die(kind):
    if kind == "exit":
        os._exit(3)
    if kind == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if kind == "slowsegv":  # time for the supervisor to tell its process to stop first
        time.sleep(1.5)
        ctypes.string_at(0)
    if kind == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # its timeout cannot fire
        time.sleep(120)


class Poison(Worker):
    prefix = "poison."
    ledger = "/dev/null"  # set with worker_options: one line per run
    marks = ""  # a directory: a job listed in crash dies on its first run only

    @job(min_processes=1, max_processes=1)
    def exit(self, job, workload):
        record(self.ledger, f"exit {job.handle}")
        die("exit")

    @job(min_processes=1, max_processes=1)
    def segv(self, job, workload):
        record(self.ledger, f"segv {job.handle}")
        die("segv")

    @job(min_processes=1, max_processes=1, timeout=0.5)
    def hang(self, job, workload):
        record(self.ledger, f"hang {job.handle}")
        die("hang")

    @job(min_processes=1, max_processes=1)
    def mixed(self, job, workload):
        """``die:<kind>`` dies, anything else is echoed."""
        text = workload.decode()
        record(self.ledger, f"mixed {text}")
        if text.startswith("die:"):
            die(text[4:])
        return workload

    @job(min_processes=1, max_processes=1)
    def forge(self, job, workload):
        """Sends each line of ``workload`` as a message on its process's channel to the
        supervisor (the one SOCK_SEQPACKET socket), as broken worker code could."""
        for fd in range(3, 1024):
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
            except OSError:
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.type == socket.SOCK_SEQPACKET:
                    for line in workload.split(b"\n"):
                        sock.send(line)
        return b"sent"

    @job(min_processes=1, max_processes=1)
    def batch(self, job, workload):
        """``<n>:<k>``: every k-th job dies at its first run (exit 0, as a job that calls
        os._exit would); every 7th raises; the others complete."""
        n, k = (int(x) for x in workload.decode().split(":"))
        mark = os.path.join(self.marks, str(n))
        if n % k == k - 1 and not os.path.exists(mark):
            open(mark, "w").close()
            os._exit(0)
        if n % 7 == 0:
            raise ValueError(f"job {n} fails")
        record(self.ledger, str(n))
        return workload
