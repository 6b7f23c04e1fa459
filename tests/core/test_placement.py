"""Placements as values: what a `Held` parameter means for where it lives and its copies."""

import torch

from core.placement import Held, ParamLayout, Placements, Shard


def test_a_held_parameter_lives_whole_on_one_coordinate_of_its_dim():
    layout = ParamLayout("moe.experts.3.w1.weight", (8, 4), torch.float32,
                         placements=Placements().with_("ep", Held(1)))
    sizes = {"ep": 2, "edp": 3, "etp": 1}
    assert str(layout) == "H(1)@ep"
    assert layout.local_shape(sizes) == (8, 4)  # whole where it is held
    assert layout.held_at({"ep": 1, "edp": 2}) and not layout.held_at({"ep": 0, "edp": 2})
    # copies of its elements: the edp ranks only (one ep rank holds it)
    assert layout.replicas(sizes, ("etp", "ep", "edp")) == 3
    split = ParamLayout("w", (8, 4), torch.float32, placements=Placements().with_("ep", Shard(0)))
    assert split.held_at({"ep": 0}) and split.replicas(sizes, ("etp", "ep", "edp")) == 3
    assert ParamLayout("r", (8,), torch.float32).replicas(sizes, ("ep", "edp")) == 6
