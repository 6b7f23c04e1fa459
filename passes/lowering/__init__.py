"""Lowering: the last passes, which turn a rank's partitioned graph into the program it runs."""
