"""The example workers `make run` serves, called with the C client as the README shows."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from support import HOST, ROOT, Gdriver, Gearmand, wait_for

gearman_cli = shutil.which("gearman")


@pytest.mark.skipif(gearman_cli is None, reason="the C client comes with gearman-tools")
def test_examples_answer_the_c_client(gearmand: Gearmand) -> None:
    g = Gdriver(
        gearmand, "--lib", str(ROOT / "examples"), "--namespaces", "gdexamples", "--interval", "1"
    ).start()
    try:
        wait_for(lambda: gearmand.workers_for("gdexamples.text.Text.reverse") >= 1, 15)

        def call(function: str, workload: str) -> str:
            out = subprocess.run(
                [gearman_cli, "-h", HOST, "-p", str(gearmand.port), "-f", function, workload],
                capture_output=True, timeout=30, check=True,
            )  # fmt: skip
            return out.stdout.decode()

        assert call("gdexamples.text.Text.reverse", "hello") == "olleh"
        # min 0: the job's process is started on demand
        counted = call("gdexamples.text.Text.wordcount", json.dumps({"text": "a b c"}))
        assert json.loads(counted) == {"words": 3}
        assert call("gdexamples.text.Text.upper", "abc") == "ABC"
    finally:
        assert g.stop() == 0
