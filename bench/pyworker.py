"""A bare pygearman worker: one function that returns its workload (throughput baseline).

Usage: pyworker.py HOST:PORT FUNCTION
"""

import sys

import gearman


def echo(worker, job):
    return job.data


def main() -> None:
    server, function = sys.argv[1], sys.argv[2]
    worker = gearman.GearmanWorker([server])
    worker.register_task(function.encode(), echo)
    worker.work()


if __name__ == "__main__":
    main()
