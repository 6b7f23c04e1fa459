"""The pipeline runner's receives (runtime.pipeline): under gloo each is posted before the peer
can send into it, so no send waits on this rank's main thread. At 1F1B's warm-up the first
stage sends its second forward's output right after its second forward, while the last stage
still runs its first forward: the receive for it must be posted before that forward runs."""

import contextlib

import torch
from torch import fx, nn

from core.schedules import schedule
from ranks import on_ranks


def _two_stage_pipeline():
    from passes.lowering.program import Pipeline, Stage, Value

    shape = (2, 4)
    values = {"x": Value("x", -1, shape, torch.float64, input_index=0),
              "h": Value("h", 0, shape, torch.float64)}
    first = fx.symbolic_trace(_Tuple(nn.Linear(4, 4).double()))
    last = fx.symbolic_trace(_Tuple(nn.Linear(4, 4).double()))
    pipeline = Pipeline(num_stages=2, pp=2, values=values, consumers={"x": [0], "h": [1]},
                        output_names=["y"], output_meta=[(shape, torch.float64)],
                        out_spec=None, stage_params={0: [], 1: []}, placement=(0, 1))
    stages = [Stage(0, first, inputs=["x"], outputs=["h"]),
              Stage(1, last, inputs=["h"], outputs=["y"])]
    return pipeline, stages


class _Tuple(nn.Module):
    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return (torch.tanh(self.linear(x)),)


def _receive_order(microbatches: int):
    """This rank's events of one 1F1B step: ("post", tag) per receive posted and
    ("run", stage, microbatch) per forward run; and the tag of each last-stage forward's
    input."""
    import torch.distributed as dist

    from runtime import pipeline as runtime_pipeline

    torch.manual_seed(0)
    rank = dist.get_rank()
    pipeline, stages = _two_stage_pipeline()
    events = []
    posted = dist.irecv

    def record_post(tensor, src, group=None, tag=0):
        events.append(("post", tag))
        return posted(tensor, src, group=group, tag=tag)

    @contextlib.contextmanager
    def forward_of(microbatch):  # entered around each forward's run
        events.append(("run", rank, microbatch))
        yield

    runner = runtime_pipeline.PipelineRunner(
        pipeline, [stages[rank]], dist.group.WORLD, [0, 1],
        lambda stage, inputs: stage.gm(*inputs), torch.device("cpu"), forward_context=forward_of)
    leaves = [[torch.randn(2, 4, dtype=torch.float64)] for _ in range(microbatches)]
    runtime_pipeline.dist.irecv = record_post
    try:
        runner.run(schedule("1f1b", 2, microbatches)[rank], leaves,
                   loss_of=lambda index, outputs: outputs[0].sum())
    finally:
        runtime_pipeline.dist.irecv = posted
    forward_tags = [runner._tag(mb, "h", 1, False) for mb in range(microbatches)]
    return runner.receive_ahead, events, forward_tags


def test_last_stage_posts_the_next_forwards_receive_before_its_first_forward():
    (ahead, _, _), (last_ahead, events, forward_tags) = on_ranks(2, _receive_order, 4)
    assert ahead == last_ahead == 2  # gloo
    first_run = events.index(("run", 1, 0))
    posted_before = {event[1] for event in events[:first_run] if event[0] == "post"}
    assert {forward_tags[0], forward_tags[1]} <= posted_before, events
    # and every forward's receive was posted (once) before that forward ran
    for mb, tag in enumerate(forward_tags):
        run = next(i for i, e in enumerate(events) if e[0] == "run" and e[2] == mb)
        assert events.index(("post", tag)) < run, events
        assert events.count(("post", tag)) == 1, events
