"""Cost model: pure functions of model shapes, hardware and plan.

Layout (one direction of imports: core only; nothing here imports the passes, the runtime or
the face, and nothing here runs anything: tools/calibrate.py measures, fit.py fits):
  shapes.py       TransformerShape: the model as a handful of integers
  hardware.py     GPU/CPU profiles (roofline + efficiency curves), clusters `NxGPU[-MEM]`
  comm.py         alpha-beta collective costs over the node hierarchy, rank placement by `order`
  layer_costs.py  one layer's forward/backward/recompute time as sympy expressions, lambdified
  graph_costs.py  per-fx-node FLOPs/bytes for captured graphs (used by the pipeline cut)
  memory.py       per-rank memory: weights, grads, AdamW/ZeRO-1, activations, buffers, the
                  allocator's margin and what is reserved outside it
  traits.py       what the time terms read: the plan on its cluster, its groups' placement
  terms/          time terms per strategy: tp.py, cp.py, ep.py, pp.py, dp.py
  step_time.py    step time, bubble, exposed comm, TFLOP/s, MFU, HFU for one plan (adds the terms)
  shared_cores.py the schedule run on a node's cores where ranks outnumber them (CPU hosts)
  search.py       the plan search and `auto_plan`
  fit.py          a hardware profile fitted to measured numbers, or GPU efficiencies fitted to
                  published runs (pure)
  published.py    the published runs (data/published_runs.json, each quoting its source) and
                  the cost model's prediction of each
"""

from cost_model.hardware import Cluster, Hardware, get_hardware, parse_cluster
from cost_model.shapes import TransformerShape

__all__ = ["Cluster", "Hardware", "TransformerShape", "get_hardware", "parse_cluster"]
