"""Kernel tests run Triton's CPU interpreter; set it up before any kernel module is imported.

Triton decides between compiling and interpreting when ``@triton.jit`` decorates a kernel, so the
variable has to be set before runtime.kernels.<op> modules load. Modules another test file
loaded earlier without it are dropped so these tests import them afresh, interpreted.
Test files that run kernels call ``pytest.importorskip("triton")``, so they skip where triton is
missing; the reference and dispatch tests run without it.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

for _name in [m for m in sys.modules if m.startswith("runtime.kernels.")]:
    if _name not in ("runtime.kernels.reference", "runtime.kernels.dispatch"):
        del sys.modules[_name]
