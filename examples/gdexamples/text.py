"""Text jobs: try them with the C client, e.g.

gearman -h 127.0.0.1 -p 4730 -f gdexamples.text.Text.reverse hello
"""

import json
import time

from gdriver import Worker, job


class Text(Worker):
    def process_name(self, orig, job_name):
        return f"gdriver worker ({job_name})"

    @job
    def reverse(self, job, workload):
        return workload[::-1]

    @job(min_processes=0, max_processes=4)
    def upper(self, job, workload):
        return workload.upper()

    @job(min_processes=0, max_processes=8, decode="decode_json", encode="encode_json")
    def wordcount(self, job, workload):
        words = workload.get("text", "").split()
        return {"words": len(words)}

    @job(min_processes=0, max_processes=5)
    def slow(self, job, workload):
        seconds = float(workload or b"1")
        steps = max(1, int(seconds * 10))
        for i in range(steps):
            time.sleep(seconds / steps)
            job.send_status(i + 1, steps)
        return f"slept {seconds:g}s"

    def decode_json(self, workload):
        return json.loads(workload)

    def encode_json(self, result):
        return json.dumps(result)
