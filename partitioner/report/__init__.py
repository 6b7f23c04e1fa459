"""Reports that read the compiler's objects, never recomputing them: one rank's program as a
node table and its pass log (program.py), every rank's as text, JSON or DOT for `dump`
(graph.py), planning reports (planning.py) and the plan CLI (plan_cli.py)."""
