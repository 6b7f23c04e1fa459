"""The pipeline executor: runs one rank's actions of a schedule (`core.schedules`).

The executor runs one rank's actions: forward of a stage receives its inputs (model input
leaves locally, activations from the producing stage's rank with irecv), runs the stage graph and
isends its outputs to every consuming stage; backward receives the gradients of its outputs,
runs autograd, and isends the gradients of its received inputs back. Under the zero-bubble
schedules the backward is two actions: "I" computes only the input gradients (sent back at
once) and keeps the graph; "W" later accumulates the weight gradients (runtime.backward_split).
Which rank runs a stage is the pipeline's placement (the schedule's). Sends never block (their
handles are waited at the end of the step) and receives block only when their value is needed,
which is deadlock-free for any schedule in which each rank's order respects the data
dependencies, as `core.schedules.action_graph` checks of every schedule there.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from core.ops import CheckpointedRegion
from core.schedules import Action
from runtime.backward_split import WeightStep, backward_input

RECEIVE_AHEAD = 2
"""Under gloo, receives are posted for the current action and this many after it. A send that
finds its receive not yet posted waits for it (the sender's isend call itself may block for
milliseconds, and the receiver's later post reads the data in), so a receive should be posted
before the peer can send. One action ahead loses that race at 1F1B's warm-up: the stage before
sends its second forward's output right after its second forward, while this rank's post for it
would wait until its own first forward ends. The buffers posted early are a few microbatches'
boundary tensors, small beside the stage activations a pipeline keeps.

Other backends keep one action ahead: NCCL runs a pair of ranks' sends and receives in order on
one stream, where a receive posted before a send the peer waits for would deadlock (a first
stage posting its first gradient's receive before sending its first forward's output)."""


class PipelineRunner:
    """Runs one rank's actions for one step."""

    def __init__(self, pipeline, stages, group, group_ranks: list[int], run_stage,
                 device: torch.device, forward_context=None) -> None:
        """`pipeline`/`stages`: passes.lowering.program's Pipeline and this rank's Stages (read
        by attribute only: the runtime does not import the compiler). `forward_context(mb)`,
        when given, is entered around each forward of microbatch `mb` (its dropout key)."""
        self.pipeline = pipeline
        self.stages = {stage.index: stage for stage in stages}
        self.group = group
        self.group_ranks = group_ranks  # global rank of every pp coordinate
        self.run_stage = run_stage  # (stage, inputs) -> outputs tuple
        self.device = device
        self.forward_context = forward_context or (lambda microbatch: contextlib.nullcontext())
        self._value_ids = {name: i for i, name in enumerate(sorted(pipeline.values))}
        self._splits = {stage.index: not any(isinstance(module, CheckpointedRegion)
                                             for module in stage.gm.modules())
                        for stage in stages}
        """Stage -> whether its backward splits into I and W. A stage with checkpointed
        regions (recompute=full, sp's gathered inputs) runs its whole backward in I and an
        empty W: torch's checkpoint recomputes a region once per autograd call, and the weight
        step is one call per group of weights (runtime.backward_split), which would recompute
        each region (and redo its all-gathers) several times over."""
        self.receive_ahead = RECEIVE_AHEAD if dist.get_backend(group) == "gloo" else 1
        self.busy_s = 0.0
        """Seconds of the last `run` spent computing (not waiting): 1 - busy/wall is the bubble."""
        self.action_s: dict[Action, float] = {}
        """Seconds each action of the last `run` spent computing."""

    # --- communication ------------------------------------------------------------------
    def _tag(self, microbatch: int, value: str, consumer: int, backward: bool) -> int:
        tag = (microbatch * len(self._value_ids) + self._value_ids[value]) * \
            self.pipeline.num_stages + consumer
        return tag * 2 + int(backward)

    def _peer(self, stage: int) -> int:
        return self.group_ranks[self.pipeline.rank_of(stage)]

    def _send(self, tensor: torch.Tensor, stage: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        self._works.append((dist.isend(tensor, self._peer(stage), group=self.group, tag=tag),
                            tensor))

    def _post_recv(self, like, stage: int, tag: int) -> None:
        if tag not in self._posted:
            out = torch.empty(like.shape, dtype=like.dtype, device=self.device)
            self._posted[tag] = (dist.irecv(out, self._peer(stage), group=self.group, tag=tag),
                                 out)

    def _recv(self, like, stage: int, tag: int) -> torch.Tensor:
        self._post_recv(like, stage, tag)
        work, out = self._posted.pop(tag)
        work.wait()
        return out

    def _prefetch(self, action: Action) -> None:
        """Post the receives `action` will need, so the transfer overlaps the current work."""
        stage = self.stages[action.stage]
        mb = action.microbatch
        if action.kind == "F":
            for name in stage.inputs:
                value = self.pipeline.values[name]
                if value.producer >= 0 and not self._same_rank(value.producer, stage.index):
                    self._post_recv(value, value.producer,
                                    self._tag(mb, name, stage.index, False))
        elif action.kind in ("B", "I") and stage.index < self.pipeline.num_stages - 1:
            for name in stage.outputs:
                value = self.pipeline.values[name]
                for consumer in self.pipeline.consumers[name]:
                    if value.differentiable and not self._same_rank(consumer, stage.index):
                        self._post_recv(value, consumer, self._tag(mb, name, consumer, True))

    # --- one step -----------------------------------------------------------------------
    def run(self, actions: list[Action], microbatch_leaves: list[list], loss_of):
        """`loss_of(microbatch, outputs)` makes the last stage's (scaled) loss, whose backward
        the "B" or "I" and "W" actions run. Returns the last stage's outputs per microbatch."""
        self._works = []
        self.busy_s = 0.0
        self.action_s = {}
        self._local = {}  # (microbatch, value, consumer, backward?) -> tensor kept on this rank
        self._inputs, self._outputs, results = {}, {}, {}
        self._weight_steps: dict[tuple[int, int], WeightStep] = {}  # after "I", until "W"
        self._leaves, self._loss_of = microbatch_leaves, loss_of
        self._posted = {}  # tag -> (irecv work, buffer) posted ahead of need
        for index, action in enumerate(actions):
            stage = self.stages[action.stage]
            busy = self.busy_s
            for ahead in actions[index:index + 1 + self.receive_ahead]:
                self._prefetch(ahead)
            if action.kind == "F":
                out = self._forward(stage, action.microbatch)
                if stage.index == self.pipeline.num_stages - 1:
                    results[action.microbatch] = out
            elif action.kind == "W":
                start = time.perf_counter()
                self._weight_steps.pop((action.microbatch, stage.index)).run()
                self.busy_s += time.perf_counter() - start
            else:
                self._backward(stage, action.microbatch, split=action.kind == "I")
            self.action_s[action] = self.busy_s - busy
        for work, _ in self._works:
            work.wait()
        self._works = []
        if self._weight_steps:
            raise RuntimeError(f"the schedule ran no W after I of (microbatch, stage) "
                               f"{sorted(self._weight_steps)}: weight gradients missing")
        return results

    def _same_rank(self, a: int, b: int) -> bool:
        return self.pipeline.rank_of(a) == self.pipeline.rank_of(b)

    def _hand_over(self, tensor, mb: int, name: str, consumer: int, to_stage: int,
                   backward: bool) -> None:
        """Give `tensor` (value `name` of microbatch `mb`, for `consumer`) to `to_stage`."""
        if self._same_rank(to_stage, self._current):
            self._local[(mb, name, consumer, backward)] = tensor.detach()
        else:
            self._send(tensor, to_stage, self._tag(mb, name, consumer, backward))

    def _take(self, value, mb: int, consumer: int, from_stage: int, backward: bool):
        if self._same_rank(from_stage, self._current):
            return self._local.pop((mb, value.name, consumer, backward))
        return self._recv(value, from_stage, self._tag(mb, value.name, consumer, backward))

    def _forward(self, stage, mb: int):
        self._current = stage.index
        received = []
        for name in stage.inputs:
            value = self.pipeline.values[name]
            if value.producer < 0:  # model inputs: every rank has the batch
                received.append(self._leaves[mb][value.input_index])
                continue
            tensor = self._take(value, mb, stage.index, value.producer, backward=False)
            received.append(tensor.detach().requires_grad_() if value.differentiable else tensor)
        start = time.perf_counter()
        with self.forward_context(mb):
            out = self.run_stage(stage, received)
        self.busy_s += time.perf_counter() - start
        self._inputs[(mb, stage.index)] = received
        self._outputs[(mb, stage.index)] = out
        if stage.index < self.pipeline.num_stages - 1:
            for name, tensor in zip(stage.outputs, out, strict=True):
                for consumer in self.pipeline.consumers[name]:
                    self._hand_over(tensor, mb, name, consumer, consumer, backward=False)
        return out

    def _backward(self, stage, mb: int, split: bool) -> None:
        """The stage's backward ("B"), or with `split` only its input gradients ("I"), the
        weight gradients kept for the "W" action."""
        self._current = stage.index
        out = self._outputs.pop((mb, stage.index))
        inputs = self._inputs.pop((mb, stage.index))
        if stage.index == self.pipeline.num_stages - 1:
            start = time.perf_counter()
            tensors, grads = [self._loss_of(mb, out)], [None]
        else:
            tensors, grads = [], []
            for name, tensor in zip(stage.outputs, out, strict=True):
                value = self.pipeline.values[name]
                if not value.differentiable:
                    continue
                # A value read by several stages gets the sum of their gradients.
                total = sum(self._take(value, mb, consumer, consumer, backward=True)
                            for consumer in self.pipeline.consumers[name])
                if tensor.requires_grad:
                    tensors.append(tensor)
                    grads.append(total)
            start = time.perf_counter()  # the receives above are waiting, not work
        if split and self._splits[stage.index]:
            leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            self._weight_steps[(mb, stage.index)] = backward_input(tensors, grads, leaves)
        else:
            if tensors:
                torch.autograd.backward(tensors, grads)
            if split:
                self._weight_steps[(mb, stage.index)] = WeightStep()  # done above
        self.busy_s += time.perf_counter() - start
        for name, tensor in zip(stage.inputs, inputs, strict=True):
            value = self.pipeline.values[name]
            if value.producer >= 0 and value.differentiable:
                grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                self._hand_over(grad, mb, name, stage.index, value.producer, backward=True)
