"""Jobs that raise what is not an ``Exception``: each fails its job, never its process."""

import asyncio
import os

from gdriver import Worker, job

GROUP = "raising"


class Stubborn(BaseException):
    """A BaseException subclass of the user's own."""


RAISES = {
    b"cancelled": asyncio.CancelledError("cancelled by the job"),
    b"interrupt": KeyboardInterrupt("interrupted by the job"),
    b"generator": GeneratorExit(),
    b"own": Stubborn("stubborn"),
}


class Raising(Worker):
    prefix = "raising."

    @job(process_group=GROUP)
    def pid(self, job, workload):
        return str(os.getpid())

    @job(process_group=GROUP)
    def base(self, job, workload):
        raise RAISES[workload]
