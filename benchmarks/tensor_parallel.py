"""Tensor-parallel fwd+bwd step time against PyTorch DTensor `parallelize_module` (issue 3).

Same Hugging Face LlamaForCausalLM (4 layers, hidden 256, batch 8 x 128), same 2 gloo ranks:
DTensor with the usual Llama plan (q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel, local
outputs) against `parallelize` with the same placements (`tp=2` with the embedding and LM head
ruled replicate); also, for the record, our default `tp=2` (vocab-parallel embedding and LM
head, cross-entropy on the logit shards) and `tp=2,sp=on`. Each timed step is forward, mean
cross-entropy and backward; the runners alternate step by step so machine noise falls on all.
Goal: ours at most 0.8x of DTensor. Prints a table and saves JSON.

    python benchmarks/tensor_parallel.py [--layers 4] [--hidden 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os

from round_robin import slowest_rank_median, time_round_robin


def _model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=2048, max_position_embeddings=256,
                         use_cache=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 2048, (args.batch, args.seq))
    return model, ids


def _loss(output, target):
    import torch.nn.functional as F

    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _dtensor_runner(args):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    model, ids = _model(args)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {}
    for i in range(args.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{name}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        for name in ("gate_proj", "up_proj"):
            plan[f"model.layers.{i}.mlp.{name}"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    target = torch.roll(ids, -1, 1)

    def step():
        model.zero_grad(set_to_none=True)
        _loss(model(ids), target).backward()
    return step


VARIANTS = {
    "ours": "tp=2,rules=model.embed_tokens:replicate;lm_head:replicate",
    "ours_default": "tp=2",
    "ours_sp": "tp=2,sp=on",
}
"""Our plans: the placements of DTensor's plan (embedding and LM head whole), then our default
(embedding and LM head vocab-parallel, the cross-entropy on logit shards), then with sequence
parallelism."""


def _our_runner(args, plan):
    import torch

    from partitioner import parallelize

    model, ids = _model(args)
    target = torch.roll(ids, -1, 1)
    pm = parallelize(model, plan, example_inputs=(ids,), loss_fn=_loss)

    def step():
        for p in pm.parameters():
            p.grad = None
        pm.step(ids, target=target)
    return step


def _rank_main(args):
    runners = {"dtensor": _dtensor_runner(args)}
    runners.update({name: _our_runner(args, plan) for name, plan in VARIANTS.items()})
    return time_round_robin(runners, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "tensor_parallel.json"))
    args = parser.parse_args()
    from runtime import spawn

    per_rank = spawn(2, _rank_main, args, timeout=1200)
    median = {name: slowest_rank_median(per_rank, name) for name in per_rank[0]}
    ratio = median["ours"] / median["dtensor"]
    print(f"HF Llama {args.layers} layers, hidden {args.hidden}, batch {args.batch}x{args.seq},"
          f" tp=2 on 2 gloo ranks (fwd+bwd)")
    print(f"  DTensor parallelize_module: {median['dtensor'] * 1e3:8.1f} ms/step")
    print(f"  partitioner, same placements:{median['ours'] * 1e3:8.1f} ms/step  "
          f"({ratio:.2f}x DTensor; goal <= 0.8x)")
    for name, plan in list(VARIANTS.items())[1:]:
        print(f"  {'partitioner ' + name + ':':<28}{median[name] * 1e3:8.1f} ms/step  "
              f"({median[name] / median['dtensor']:.2f}x DTensor)  {plan}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "median_s": median, "ratio": ratio, "raw": per_rank},
                  f, indent=1)


if __name__ == "__main__":
    main()
