"""Time terms per parallel strategy, each a function of `cost_model.traits.Traits`:

  tp.py  tensor (and sequence) parallel collectives of a block, the vocab-parallel embedding
         and LM head
  cp.py  context-parallel attention: the ring's k/v hops or Ulysses' all-to-alls
  ep.py  expert-parallel token all-to-alls of an MoE block
  pp.py  pipeline p2p hops, the tied-embedding sync, the schedule's span over the stages
  dp.py  data-parallel gradient sync (all-reduce or ZeRO-1's reduce-scatter + all-gather) and
         the loss sum

step_time.py adds them to the blocks' compute. cp.py and ep.py hold what the model has for
context and expert parallelism today; their issues extend them there.
"""
