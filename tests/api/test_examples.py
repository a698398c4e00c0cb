"""Every script in docs/examples runs (small sizes), and the README's Python snippet runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))

# small sizes per script, and a line its output must contain; a new example runs with its
# defaults until it is listed here
SMALL = {
    "training_loop.py": (["--steps", "4"], "checkpoint round trip"),
    "metrics_server.py": (["--steps", "3", "--port", "0"], "dreampool_size"),
    "batch_retrieval.py": (["--entries", "400", "--queries", "3000"], "ids (3000, 5) torch.int64"),
    "sync_free_step.py": (["--steps", "12"], "sync-free steps: 12"),
}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_examples_are_found():
    assert {p.name for p in EXAMPLES} >= set(SMALL)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    args, expected = SMALL.get(script.name, ([], ""))
    done = _run([str(script), *args], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout
    assert "Traceback" not in done.stderr


def test_training_loop_uses_only_documented_calls():
    import ast

    source = (ROOT / "docs" / "examples" / "training_loop.py").read_text()
    api = (ROOT / "docs" / "api.md").read_text()
    tree = ast.parse(source)
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {m for m in modules if m.startswith("dreampool_gpu")}
    assert ours <= {"dreampool_gpu", "dreampool_gpu.synthetic"}, ours  # no undocumented helpers (demo)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ours:
            for alias in node.names:
                assert f"`{alias.name}`" in api, alias.name  # each imported name is in docs/api.md
    calls = {
        n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id in ("pool", "restored")
    }
    assert calls, "the example calls no pool method"
    for name in calls:
        assert f"`pool.{name}(" in api, name  # a documented DreamPool call
    assert calls & {"sample", "retrieve"} and "feedback" in calls  # it replays, and feeds utility back
    assert "cross_entropy" in source and 'reduction="none"' in source  # utility from per-dream losses


def test_readme_python_snippet_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python block"
    script = tmp_path / "readme_snippet.py"
    script.write_text("\n\n".join(blocks))
    done = _run([str(script)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"precision@10: ([0-9.]+)", done.stdout)
    assert found, done.stdout[-2000:]  # the encoder snippet prints the precision it reaches
    assert float(found.group(1)) >= 0.9  # a good fit, as the README says (1.0 measured)
    assert "never fitted" not in done.stderr


def test_configuration_doc_lists_every_field():
    import dataclasses

    from dreampool_gpu import PoolConfig

    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f.name for f in dataclasses.fields(PoolConfig) if f"| `{f.name}` |" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"
