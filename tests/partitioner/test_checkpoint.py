"""Sharded checkpoints: saved under one plan, loaded under another, the model and its AdamW
state carry over exactly (the same outputs and the same next step, float64); a plain
single-device state dict loads; an interrupted save leaves nothing that loads."""

import copy
import os

import torch
import torch.distributed as dist

from partitioner.capture import shared_captures
from partitioner.check import lm_loss
from partitioner.checkpoint import CheckpointError
from partitioner.models import tiny_llama
from ranks import on_ranks

ROUTES = {  # saved under -> loaded under (the same plan last: that one must be bitwise)
    "tp=2,pp=2,mb=2": ["dp=4", "tp=4", "tp=2,dp=2,zero=1", "tp=2,pp=2,mb=2"],
    "tp=2,dp=2,zero=1": ["pp=2,dp=2,zero=1,mb=2", "tp=2,dp=2,zero=1"],
}


def _model(seed: int):
    torch.manual_seed(seed)
    model, (ids,) = tiny_llama(batch=8, seq=16, fused_qkv=True, n_kv_head=4,
                               vocab_size=250)  # 250: padded under tp=4
    return model.double(), ids


def _train_step(pm, opt, ids):
    opt.zero_grad()
    loss = pm.step(ids, target=ids.roll(-1, 1))
    opt.step()
    return loss


def _worker(path: str):
    with shared_captures(("test_checkpoint", "_model")):  # one model, captured once
        return _save_and_load(path)


def _save_and_load(path: str):
    from partitioner import parallelize

    model, ids = _model(0)
    plain = os.path.join(os.path.dirname(path), "plain.pt")
    if dist.get_rank() == 0:
        torch.save(model.state_dict(), plain)
    errors = {}
    for save_plan, load_plans in ROUTES.items():
        pm = parallelize(copy.deepcopy(model), save_plan, example_inputs=(ids,), loss_fn=lm_loss)
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
        _train_step(pm, opt, ids)
        pm.save(path, optimizer=opt)
        _train_step(pm, opt, ids)  # the step every loaded plan must repeat
        expected_out = pm(ids).detach()
        expected = pm.full_state_dict()
        for plan in load_plans:
            other, _ = _model(1)  # other weights: everything must come from the checkpoint
            loaded = parallelize(other, plan, example_inputs=(ids,), loss_fn=lm_loss)
            loaded_opt = torch.optim.AdamW(loaded.parameters(), lr=5.0)  # lr: from the file
            loaded.load(path, optimizer=loaded_opt)
            _train_step(loaded, loaded_opt, ids)
            state = loaded.full_state_dict()
            errors[f"{save_plan} -> {plan}"] = max(
                [(loaded(ids) - expected_out).abs().max().item()]
                + [(state[k] - expected[k]).abs().max().item() for k in expected])
    fresh = parallelize(_model(1)[0], "tp=2,dp=2", example_inputs=(ids,), loss_fn=lm_loss)
    dist.barrier()
    fresh.load(plain)  # torch.save(model.state_dict()) of the single-device model
    plain_error = max((v - model.state_dict()[k]).abs().max().item()
                      for k, v in fresh.full_state_dict().items())
    return errors, plain_error


def test_a_checkpoint_moves_between_plans(tmp_path):
    results = on_ranks(4, _worker, str(tmp_path / "ckpt"), timeout=900)
    for errors, plain_error in results:
        assert len(errors) == sum(len(plans) for plans in ROUTES.values())
        assert all(err < 1e-12 for err in errors.values()), errors  # reduction order differs
        same = [f"{plan} -> {plan}" for plan in ROUTES]
        assert all(errors[key] == 0.0 for key in same), errors  # the same plan: bitwise
        assert plain_error == 0.0


def _interrupted(path: str):
    import torch.distributed.checkpoint as dcp

    from partitioner import parallelize

    model, ids = _model(0)
    pm = parallelize(model, "dp=2", example_inputs=(ids,), loss_fn=lm_loss)
    real_save = dcp.save

    def dies_half_way(state_dict, storage_writer):
        real_save(dict(list(state_dict.items())[:3]), storage_writer=storage_writer)
        raise RuntimeError("killed during the save")

    dcp.save = dies_half_way
    try:
        pm.save(path)
    except RuntimeError:
        pass
    finally:
        dcp.save = real_save
    dist.barrier()
    try:
        pm.load(path)
    except CheckpointError as error:
        return str(error)
    return "loaded"


def test_an_interrupted_save_is_not_a_checkpoint(tmp_path):
    messages = on_ranks(2, _interrupted, str(tmp_path / "ckpt"), timeout=600)
    for message in messages:
        assert "no checkpoint at" in message and "interrupted save" in message
