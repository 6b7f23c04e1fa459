"""Bad input to parallelize/step fails clearly, on every rank, before any collective."""

import pytest

from partitioner import PlanError, parallelize
from partitioner.models import tiny
from ranks import on_ranks


def test_parallelize_without_a_process_group_says_how_to_launch():
    model, (ids,) = tiny()
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(model, "dp=1", example_inputs=(ids,))


def _bad_inputs():
    from partitioner.check import lm_loss

    model, (ids,) = tiny(batch=4)
    messages = {}
    for name, call in {
        "batch_not_divisible": lambda: parallelize(model, "dp=2,mb=4", example_inputs=(ids,)),
        "world_mismatch": lambda: parallelize(model, "dp=4", example_inputs=(ids,)),
        "not_built_yet": lambda: parallelize(model, "tp=2,sp=on,async_tp=on,compile=on",
                                                 example_inputs=(ids,)),
    }.items():
        try:
            call()
            messages[name] = None
        except (PlanError, NotImplementedError) as error:
            messages[name] = str(error)
    pm = parallelize(model, "dp=2", example_inputs=(ids,), loss_fn=lm_loss)
    try:
        pm.step(ids[:3], target=ids[:3])
    except ValueError as error:
        messages["step_batch"] = str(error)
    try:
        parallelize(model, "dp=2", example_inputs=(ids,)).step(ids)  # logits are no loss
    except ValueError as error:
        messages["no_loss_fn"] = str(error)
    return messages


def test_bad_inputs_fail_the_same_way_on_every_rank():
    for messages in on_ranks(2, _bad_inputs, timeout=240):
        assert "does not split into dp*microbatches=2*4=8" in messages["batch_not_divisible"]
        assert "!= world size 2" in messages["world_mismatch"]
        assert "async tensor parallelism with compile=on or a zero-bubble schedule" in \
            messages["not_built_yet"] and "is not available yet" in messages["not_built_yet"]
        assert "divisible by dp*microbatches=2*1=2; got batch 3" in messages["step_batch"]
        assert "step needs loss_fn" in messages["no_loss_fn"]
