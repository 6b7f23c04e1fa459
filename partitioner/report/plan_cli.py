"""`partitioner plan MODEL --cluster 64xH100 ...`: search plans offline and report them.

cli.py registers the subcommand with `add_arguments(parser)` and calls `run(args)`; errors are
ValueError with a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="preset, gpt:layers=..,hidden=..,heads=.., a Hugging Face "
                             "config.json, or pkg.module:factory")
    parser.add_argument("--cluster", help="NxGPU[-MEM], e.g. 64xH100 or 512xA100-80G "
                                          "(8 GPUs a node)")
    parser.add_argument("--cluster-file", help="JSON cluster description (see "
                                               "cost_model/hardware.py:load_cluster_file)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default: max(8, GPUs))")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (overrides the "
                                                               "model's)")
    parser.add_argument("--fix", default=None, help='plan fields to hold, e.g. "tp=8,pp=8"')
    parser.add_argument("--top", type=int, default=5, help="candidates to show")
    parser.add_argument("--report", default=None, help="write out.html or out.md")
    parser.add_argument("--json", action="store_true", help="print the JSON result")


def load_model_shape(model: str, seq: int | None = None):
    """MODEL argument -> cost_model.TransformerShape."""
    from cost_model.shapes import TransformerShape

    cfg = model_config(model)
    return TransformerShape.from_gpt_config(cfg, seq=seq)


def model_config(model: str):
    """A partitioner.models.GPTConfig for a preset, inline shape, config.json or factory."""
    from partitioner import models

    if model in models.PRESETS or model.startswith("gpt:"):
        return models.resolve_config(model)
    if model.endswith(".json") or Path(model).is_file():
        return hf_config(model)
    if ":" in model:
        return _factory_config(model)
    raise ValueError(f"unknown model {model!r}: use a preset ({', '.join(models.PRESETS)}), "
                     f"gpt:layers=..,hidden=..,heads=.., a config.json or pkg.module:factory")


_HF_KEYS = {  # GPTConfig field -> Hugging Face keys (Llama / GPT-2 / Mixtral spellings)
    "n_layer": ("num_hidden_layers", "n_layer"),
    "n_embd": ("hidden_size", "n_embd"),
    "n_head": ("num_attention_heads", "n_head"),
    "n_kv_head": ("num_key_value_heads",),
    "ffn_hidden": ("intermediate_size", "n_inner"),
    "vocab_size": ("vocab_size",),
    "seq_len": ("max_position_embeddings", "n_positions"),
    "n_experts": ("num_local_experts", "n_routed_experts"),
    "topk": ("num_experts_per_tok",),
    "moe_ffn_hidden": ("moe_intermediate_size",),
}


def hf_config(path: str):
    from partitioner.models import GPTConfig

    from cost_model.hardware import read_json

    data = read_json(path, "config file")
    fields = {}
    for name, keys in _HF_KEYS.items():
        for key in keys:
            if data.get(key) is not None:
                fields[name] = int(data[key])
                break
    missing = [k for k in ("n_layer", "n_embd", "n_head") if k not in fields]
    if missing:
        raise ValueError(f"{path!r} lacks {', '.join(_HF_KEYS[k][0] for k in missing)}")
    llama = data.get("model_type", "") not in ("gpt2", "gpt_neox", "gptj") and (
        "intermediate_size" in data or data.get("hidden_act") == "silu")
    if llama:
        fields.update(norm="rmsnorm", position="rope", swiglu=True, bias=False,
                      tie_embeddings=bool(data.get("tie_word_embeddings", False)))
    if fields.get("n_experts", 0) == 0:
        fields.pop("topk", None)
    return GPTConfig(**fields)


def _factory_config(spec: str):
    from partitioner.models import GPTConfig

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model factory {spec!r}: {exc}") from None
    out = factory()
    model = out[0] if isinstance(out, tuple) else out
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"{spec!r} returned a model without a GPTConfig `.config`; the planner "
                         f"needs its shape: pass a preset, gpt:... or a config.json instead")
    return cfg


def run(args: argparse.Namespace) -> int:
    from cost_model.hardware import load_cluster_file, parse_cluster
    from cost_model.search import default_global_batch, search

    if not args.cluster and not getattr(args, "cluster_file", None):
        raise ValueError("give --cluster NxGPU (e.g. 64xH100) or --cluster-file F")
    cluster = (load_cluster_file(args.cluster_file) if getattr(args, "cluster_file", None)
               else parse_cluster(args.cluster))
    shape = load_model_shape(args.model, seq=args.seq)
    batch = args.global_batch or default_global_batch(cluster.num_gpus)
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top {args.top} must be >= 1")
    result = search(shape, cluster, batch, shape.seq, fixed=args.fix, top_k=args.top or 5)
    if args.report:
        from partitioner.report.planning import write_report

        write_report(result, args.report, title=args.model)
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from partitioner.report.planning import render_text

        sys.stdout.write(render_text(result, title=args.model))
    return 0
