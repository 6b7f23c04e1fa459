"""What a fresh `pip install` gets: the dependencies torch needs to start quietly."""

import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_numpy_is_declared_so_torch_never_warns_it_is_missing():
    """torch imports numpy when present and otherwise warns "Failed to initialize NumPy" on
    every rank; it is not one of torch's own requirements, so we declare it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0] for spec in project["dependencies"]}
    assert "numpy" in names
    done = subprocess.run([sys.executable, "-c", "import torch; torch.zeros(2).numpy()"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Failed to initialize NumPy" not in done.stderr
