"""Lowering: the end of the pass pipeline, where the rewritten graph becomes what ranks run.

`stages.lower_stages` (the registry's `lowering` entry) cuts the one flat graph into a parent
GraphModule with one submodule per pipeline stage, and records the `program.Pipeline` (who
makes and who reads each value crossing a stage). `program` holds the records a rank's program
is made of (`Stage`, `Value`, `Pipeline`, `RankProgram`), read off the lowered graph.
"""
