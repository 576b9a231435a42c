"""Shared base classes (Perl's Test::Base::All and Test::Base::TestWorker)."""

from gdriver import Worker


class All(Worker):
    def process_name(self, orig, job_name):
        return f"{orig} ({job_name})"


class TestWorker(All):
    """begin/end append to the file named by the workload."""

    def begin(self, job, workload):
        with open(workload, "a") as f:
            f.write("begin ...\n")

    def end(self, job, workload, error):
        with open(workload, "a") as f:
            f.write("end ...\n")
