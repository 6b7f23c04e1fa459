"""Compiled stage graphs: each lowered GraphModule run through inductor (`compile=on`).

The graphs the passes emit are aten fx with their collectives as `partitioner::` ops that carry
their process group (and whose forward and backward are `_c10d_functional` ops + `wait_tensor`),
so `torch.compile(gm, backend=..., fullgraph=True, dynamic=False)` takes a whole stage as one
graph: AOTAutograd makes its forward and backward and inductor compiles both (C++ on CPU,
Triton on GPU). Dynamo only reads the GraphModule's generated code here: it never sees the
model's Python. Each graph is compiled at its first call (the executor keeps one graph per
input shape, so the compiled artefacts are cached per shape as the graphs are); the backward
is compiled at its first backward.

A graph that cannot be compiled (a graph break, an op inductor rejects) runs eagerly: one
logged line names the graph and why, and `records()` keeps the reason for `explain()`. A
failure after compilation (a collective's error) is never retried eagerly: it is raised.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from core import ops
from runtime import collectives

log = logging.getLogger("partitioner.compile")


@dataclass
class CompileRecord:
    """How one stage graph runs under compile=on."""

    name: str
    """Which graph: stage and input shape, as the executor names it."""
    compile_s: float = 0.0
    """Seconds spent compiling: the first call (dynamo + AOTAutograd + inductor's forward,
    and that one run), inductor's backward at the first backward, and any recompilation
    (a call under another grad mode)."""
    graphs: int = 0
    """Graphs handed to inductor: one per stage graph and grad mode it ran under (a stage cut
    by graph breaks would hand over several)."""
    collectives: int = 0
    """Collective ops inside those graphs (compiled with the compute around them)."""
    eager: str | None = None
    """Why the graph runs eagerly; None when it runs compiled."""

    def summary(self) -> str:
        if self.eager is not None:
            return f"{self.name}: eager ({self.eager})"
        state = "compiled" if self.graphs else "not run yet"
        return (f"{self.name}: {state}, {self.graphs} inductor graph(s) holding "
                f"{self.collectives} collective(s), {self.compile_s:.1f}s compiling")


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises (dynamo's own errors wrap the backend's)."""
    from torch._dynamo import exc

    return (exc.TorchDynamoException,)


class CompiledGraphs:
    """This rank's stage graphs, each compiled at its first call (one per GraphModule)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[fx.GraphModule, Callable, CompileRecord]] = {}
        """id(graph) -> (the graph, kept alive so the id stays its own; what runs; record)."""

    def records(self) -> list[CompileRecord]:
        return [record for _, _, record in self._entries.values()]

    def eager(self, gm: fx.GraphModule, name: str, why: str) -> None:
        """Run `gm` eagerly for a reason found before its first call (one logged line)."""
        record = CompileRecord(name, eager=why)
        log.warning("compile=on: %s runs eagerly: %s", name, why)
        self._entries[id(gm)] = (gm, gm, record)

    def __call__(self, gm: fx.GraphModule, name: Callable[[], str], *args, **kwargs):
        """Run `gm` (compiled at its first call); `name()` names it in reports."""
        entry = self._entries.get(id(gm))
        if entry is None:
            return self._first_call(gm, name(), args, kwargs)
        return entry[1](*args, **kwargs)

    def _first_call(self, gm: fx.GraphModule, name: str, args: tuple, kwargs: dict):
        record = CompileRecord(name)
        first_call = [True]  # timed whole while it runs; later compilations time themselves
        compiled = torch.compile(gm, backend=self._backend(record, first_call),
                                 fullgraph=True, dynamic=False)
        start = time.perf_counter()
        try:
            out = compiled(*args, **kwargs)
        except _compile_errors() as error:
            # compilation runs before the graph does: nothing of it ran, eager is safe
            reason = _first_line(error)
            self.eager(gm, name, f"inductor could not compile it: {reason}")
            return gm(*args, **kwargs)
        finally:
            first_call[0] = False
        record.compile_s += time.perf_counter() - start
        self._entries[id(gm)] = (gm, compiled, record)
        return out

    def _backend(self, record: CompileRecord, first_call: list[bool]):
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        from torch._inductor.decomposition import select_decomp_table

        # the collective ops' forwards inlined as _c10d_functional ops (their backwards are)
        decompositions = _DecompositionTable({**select_decomp_table(), **collectives.FORWARD})

        in_forward = [False]

        def inner(*args, **kwargs):  # the forward inside `backend`; the backward lazily
            start = time.perf_counter()
            try:
                return compile_fx_inner(*args, **kwargs)
            finally:
                if not in_forward[0]:
                    record.compile_s += time.perf_counter() - start

        def backend(gm: fx.GraphModule, example_inputs):
            record.graphs += 1
            record.collectives += sum(node.target in ops.GROUPED for node in gm.graph.nodes)
            in_forward[0] = True
            start = time.perf_counter()
            try:
                # AOTAutograd's cache keys the graph before our decompositions, so it would
                # return a stale compilation after runtime/collectives.py changes; inductor's
                # own cache (keyed on the graph after them, and on _DecompositionTable's
                # identity) is what persists compilations across processes
                with torch._functorch.config.patch(enable_autograd_cache=False):
                    return compile_fx(gm, example_inputs, inner_compile=inner,
                                      decompositions=decompositions)
            finally:
                in_forward[0] = False
                if not first_call[0]:  # a recompilation (the first call is timed whole)
                    record.compile_s += time.perf_counter() - start
        return backend


class _DecompositionTable(dict):
    """inductor's decomposition table with the collectives' forwards. Inductor's FX graph cache
    pickles it into each graph's key, which a table holding lambdas (ours) and pybind functions
    (some of inductor's) cannot be: every compilation would bypass the cache and recompile in
    every process. It pickles as its identity instead: the source of runtime.collectives (the
    rest of the table is torch's, whose version the key holds)."""

    def __reduce__(self):
        return _decomposition_table, (_collectives_identity(),)


def _decomposition_table(identity: str) -> str:
    """What a pickled _DecompositionTable stands for in a cache key (never unpickled)."""
    return identity


@functools.lru_cache(maxsize=1)
def _collectives_identity() -> str:
    return hashlib.sha256(inspect.getsource(collectives).encode()).hexdigest()


def _first_line(error: BaseException) -> str:
    """The cause in one line: the backend's own error where dynamo wrapped one."""
    cause = getattr(error, "inner_exception", None) or error
    text = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {text[0][:300] if text else ''}"
