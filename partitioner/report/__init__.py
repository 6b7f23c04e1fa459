"""Reports that read the compiler's objects: planning reports (planning.py), the plan CLI."""
