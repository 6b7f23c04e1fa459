"""The loss route of `step`: which stages and which loss a program's step runs.

Chosen at the first step for each program and target shape: the vocab-parallel cross-entropy
on the logit shards when the last stage returns vocab-parallel logits and `loss_fn` is a
cross-entropy of them (partitioner.loss_trace), else the gathered logits and `loss_fn` as is.
Also the loss contract itself (`microbatch_loss`): a scalar mean, or (loss_sum, tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from partitioner.capture import input_key
from partitioner.loss_trace import (LossPath, choose_loss_path, find_sharded_logits,
                                    local_logits_graph, output_leaves)
from partitioner.state import LocalState
from passes.lowering.program import RankProgram, Stage
from runtime.mesh import Mesh

log = logging.getLogger("partitioner.api")  # the name users and tests filter the choice by

LossFn = Callable[[object, object], object]


@dataclass(frozen=True)
class LossRoute:
    """What `step` runs for one program and target shape: its stages and the loss path."""

    stages: list
    """The program's stages, the last one possibly returning local logits shards."""
    path: LossPath | None = None
    """The loss path chosen at the first step; None on ranks without the last stage or
    without vocab-parallel logits (the user's loss_fn runs as is)."""

    def loss_fn(self, user_loss_fn: LossFn | None) -> LossFn | None:
        """The loss `step` calls: the vocab-parallel rewrite or the user's own."""
        if self.path is None or not self.path.vocab_parallel:
            return user_loss_fn
        return self.path.loss


class LossRouter:
    """Chooses and caches the loss route of each (program, target shape)."""

    def __init__(self, loss_fn: LossFn | None, mesh: Mesh, state: LocalState, rank: int,
                 device: torch.device) -> None:
        self.loss_fn = loss_fn
        self.mesh = mesh
        self.state = state
        self.rank = rank
        self.device = device
        self._routes: dict[tuple, LossRoute] = {}
        """(microbatch input key, target key) -> how step computes that loss."""
        self._local_logits_stages: dict[tuple, list] = {}
        """Microbatch input key -> the program's stages returning local logits shards."""

    def route(self, program: RankProgram, microbatch: tuple) -> LossRoute:
        """The stages and loss of `step` for this program and target shape, chosen at the
        first step."""
        args, kwargs, target = microbatch
        key = (input_key(args, kwargs), input_key((target,), {}))
        route = self._routes.get(key)
        if route is None:
            route = self._choose(program, target, key[0])
            self._routes[key] = route
        return route

    def _choose(self, program: RankProgram, target, program_key) -> LossRoute:
        last = program.stages[-1]
        if program.pipeline is not None and last.index != program.pipeline.num_stages - 1:
            return LossRoute(program.stages)  # another pp rank computes the loss
        sharded = find_sharded_logits(last.gm)
        if not sharded:
            return LossRoute(program.stages)
        out_spec = (program.pipeline.out_spec if program.pipeline is not None
                    else last.gm.graph._codegen.pytree_info.out_spec)
        path = choose_loss_path(self.loss_fn, out_spec, output_leaves(last.gm), sharded, target,
                                self.device, self.mesh.group_names())
        # Every rank of the group must agree (the loss runs collectives over it): a decision
        # that differed on one rank (a rank-dependent loss_fn) would hang the step.
        agreed = torch.tensor([int(path.vocab_parallel)], device=self.device)
        for dim in sorted({item.mesh_dim for item in sharded}):
            if self.mesh.group(dim) is not None:
                dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.mesh.group(dim))
        if path.vocab_parallel and not agreed.item():
            path = LossPath(None, "another rank of the vocabulary's group could not take the "
                                  "vocab-parallel path")
        log.info("rank %d: step loss path: %s", self.rank, path)
        if not path.vocab_parallel:
            return LossRoute(program.stages, path)
        stages = self._local_logits_stages.get(program_key)
        if stages is None:  # one variant per program, whatever the target shapes
            variant = local_logits_graph(last.gm, sharded)
            self.state.bind_graph(variant, program)
            stages = program.stages[:-1] + [Stage(last.index, variant, last.inputs,
                                                  last.outputs)]
            self._local_logits_stages[program_key] = stages
        return LossRoute(stages, path)

    def explain_lines(self, program: RankProgram) -> list[str]:
        """The loss paths `step` chose, or what it will choose at the first step."""
        paths = list(dict.fromkeys(str(route.path) for route in self._routes.values()
                                   if route.path is not None))
        if not self._routes and _holds_last_stage(program) and \
                find_sharded_logits(program.stages[-1].gm):
            paths = ["chosen at the first step (vocab-parallel cross-entropy if loss_fn is a "
                     "cross-entropy of the logits, else gathered logits)"]
        return [f"step loss path: {path}" for path in paths]


def _holds_last_stage(program: RankProgram) -> bool:
    pipeline = program.pipeline
    return pipeline is None or program.stages[-1].index == pipeline.num_stages - 1


def microbatch_loss(output, target, loss_fn: LossFn | None):
    """(loss, tokens or None) of one microbatch, per the loss_fn contract (`loss_fn`: the
    user's, or its vocab-parallel rewrite; None: the model returns its own loss)."""
    if loss_fn is not None:
        result = loss_fn(output, target)
    elif isinstance(output, torch.Tensor) and output.dim() == 0:
        result = output
    elif getattr(output, "loss", None) is not None:
        result = output.loss
    elif isinstance(output, dict) and "loss" in output:
        result = output["loss"]
    else:
        raise ValueError("step needs loss_fn(output, target) -> loss: the model's output "
                         f"({type(output).__name__} {tuple(getattr(output, 'shape', ()))}) "
                         f"is not a scalar loss; pass loss_fn to parallelize")
    if isinstance(result, (tuple, list)):
        loss_sum, tokens = result
        return loss_sum, tokens
    if not isinstance(result, torch.Tensor) or result.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor or (loss_sum, token_count); "
                         f"got {type(result).__name__} {getattr(result, 'shape', '')}")
    return result, None
