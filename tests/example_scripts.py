"""The example scripts (examples/*.py) as modules and as commands, for the tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NAMES = ("tp", "sp", "pp", "cp", "dp", "ep", "full")
GUIDE_WORLD = {"tp": 8, "sp": 8, "pp": 16, "cp": 32, "dp": 64, "ep": 16, "full": 16}
"""The rank count of each guide job."""


def common():
    """examples/_common.py (the scripts import it by that name, from their own folder)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import _common

    return _common


def example(name: str):
    """The `EXAMPLE` of examples/<name>.py, loaded without running it."""
    common()
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXAMPLE


def run(*command: str, torchrun: int | None = None, timeout: float = 600):
    """`python examples/<script> args...` (or under torchrun with that many ranks) from the
    repository root, with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    script, *args = command
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={torchrun}"] if torchrun else [sys.executable])
    return subprocess.run([*launch, str(EXAMPLES / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
