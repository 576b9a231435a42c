"""Drives gear's client (PyPI gear, OpenStack's) for the compatibility matrix.

Usage: python client_gear.py SPEC.json; prints one JSON object. Run as its own process, like
the Perl and PHP clients, so that gear's threads never live in the test process.
"""

import json
import sys
import time
from pathlib import Path

import gear


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    host, port = spec["server"].rsplit(":", 1)
    # two submissions with one unique need two connections: gear tracks jobs by handle
    clients = [gear.Client("compat") for _ in range(2 if spec["op"] == "pair" else 1)]
    for client in clients:
        if spec.get("exceptions"):
            client.options.add(b"exceptions")  # sent as OPTION_REQ on connect
        client.addServer(host, int(port))
        client.waitForServer(30)
    workload = Path(spec["workload_file"]).read_bytes() if spec.get("workload_file") else b""
    unique = spec.get("unique")
    out: dict = {}
    if spec["op"] == "background":
        job = gear.Job(spec["function"].encode(), workload, unique=unique)
        clients[0].submitJob(job, background=True)
        out["handle"] = job.handle.decode()
    else:
        count = 2 if spec["op"] == "pair" else 1
        jobs = [gear.Job(spec["function"].encode(), workload, unique=unique) for _ in range(count)]
        for client, job in zip(clients, jobs, strict=True):
            client.submitJob(job)
        deadline = time.monotonic() + 60
        while not all(j.complete for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        runs = []
        for job in jobs:
            status = [[int(job.numerator), int(job.denominator)]] if job.numerator else []
            runs.append(
                {
                    "complete": job.complete,
                    "failed": job.failure,
                    "data": [bytes(d).hex() for d in job.data],
                    "warning": job.warning,
                    "status": status,
                    "exception": job.exception.decode() if job.exception else None,
                }
            )
        out["runs"] = runs
    for client in clients:
        client.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
