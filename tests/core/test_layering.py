"""core/ is the bottom layer: it never reaches a process group (import-linter checks that it
imports nothing of ours; external subpackages such as torch.distributed are checked here)."""

import ast
import pathlib

CORE = pathlib.Path(__file__).resolve().parents[2] / "core"


def test_core_never_imports_torch_distributed():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("torch.distributed")]
    assert not offenders
