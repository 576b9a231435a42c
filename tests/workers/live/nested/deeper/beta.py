from gdriver import Worker, job


class Beta(Worker):
    @job(min_processes=0)
    def run(self, job, workload):
        return "beta"


class NoJobs(Worker):
    def plain_method(self):
        return "not a job"


class NotAWorker:
    @job
    def run(self, job, workload):
        return "ignored: not a gdriver.Worker"
