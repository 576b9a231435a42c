"""The README's worker and client examples, run as written against a real gearmand and gdriver."""

from __future__ import annotations

import builtins
import re
import subprocess
import symtable
import sys
from pathlib import Path

from support import ROOT, Gdriver, Gearmand, wait_for

README = ROOT / "README.md"
WORKER_PATH = "myapp/workers/images.py"
CLIENT_PATH = "client.py"
# the one address the client example names; the test points it at its own gearmand
README_SERVER = "gearmand:4730"


def python_block(path_comment: str) -> str:
    """The README's python code block whose first line is `# <path_comment>`."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.M | re.S)
    found = [b for b in blocks if b.startswith(f"# {path_comment}\n")]
    assert len(found) == 1, (
        f"README.md must have exactly one ```python block starting with '# {path_comment}'; "
        f"found {len(found)}"
    )
    return found[0]


def unbound_globals(source: str) -> list[str]:
    """Global names the code reads but neither imports, defines nor finds in builtins."""
    top = symtable.symtable(source, "<block>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    read, tables = set(), [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        read |= {
            s.get_name()
            for s in table.get_symbols()
            if s.is_referenced() and (table is top or s.is_global())
        }
    return sorted(read - bound - set(dir(builtins)))


def test_unbound_globals_finds_what_a_block_does_not_import() -> None:
    method = "class A:\n    @job\n    def f(self):\n        return json, g\n"
    assert unbound_globals("import json\nfrom x import job\n" + method) == ["g"]
    assert unbound_globals("import json\ng = 1\n" + method) == ["job"]


def test_readme_examples_import_or_define_what_they_use() -> None:
    worker = python_block(WORKER_PATH)
    assert worker.count("import json") == 1
    assert unbound_globals(worker) == []
    assert unbound_globals(python_block(CLIENT_PATH)) == []


def test_readme_worker_and_client_run_as_written(gearmand: Gearmand, tmp_path: Path) -> None:
    package = tmp_path / "myapp" / "workers"
    package.mkdir(parents=True)
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "images.py").write_text(python_block(WORKER_PATH))
    client = python_block(CLIENT_PATH)
    assert client.count(f'"{README_SERVER}"') == 1, f"the client example must name {README_SERVER}"
    (tmp_path / CLIENT_PATH).write_text(
        client.replace(f'"{README_SERVER}"', f'"{gearmand.address}"')
    )

    thumbnail = "myapp.workers.images.Images.thumbnail"
    g = Gdriver(
        gearmand, "--lib", str(tmp_path), "--namespaces", "myapp.workers", "--interval", "1"
    ).start()
    try:
        wait_for(lambda: gearmand.workers_for(thumbnail) >= 1, 15)
        out = subprocess.run(
            [sys.executable, CLIENT_PATH], cwd=tmp_path, capture_output=True, timeout=60
        )
        stdout, stderr = out.stdout.decode(), out.stderr.decode()
        assert out.returncode == 0, stderr
        lines = stdout.splitlines()
        assert len(lines) == 5, stdout
        # foreground: the result, the last status, data and warnings
        assert lines[0] == "{'w': 1024}", stdout
        assert lines[1] == "2 2", stdout
        assert lines[2] == "[b'resized'] [b'width capped at 1024']", stdout
        # the failing job: the worker's exception message, handled by the client
        assert lines[3] == "failed: ValueError: width must be positive, got 0", stdout
        # background: a job handle, and the job is taken from the queue and done
        assert re.fullmatch(r"b'H:[^']+'", lines[4]), stdout
        wait_for(lambda: gearmand.status().get(thumbnail, (1, 0, 0))[0] == 0, 15)
        # the one failure is the one the example asks for; the thumbnail job did not fail
        errors = [r for r in g.records() if r.get("level") in ("ERROR", "CRITICAL")]
        assert [(r["level"], r.get("function")) for r in errors] == [
            ("ERROR", "myapp.workers.images.Images.resize")
        ], [r["message"] for r in errors]
    finally:
        assert g.stop() == 0
