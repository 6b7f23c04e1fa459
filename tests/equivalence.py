"""Equivalence cases run on spawned ranks: one spawn checks many (name, factory, factory kwargs,
plan, dtype[, check_rank options]) cases, since every rank pays torch's import time."""

from __future__ import annotations

from partitioner import models


def equivalence_worker(cases):
    """On every rank: `check_rank` for each case; a factory is a callable or a name in
    partitioner.models."""
    from partitioner.check import check_rank

    reports = []
    for name, factory, kwargs, plan, dtype, *options in cases:
        factory = getattr(models, factory) if isinstance(factory, str) else factory
        report = check_rank(factory, plan, dtype=dtype, factory_kwargs=kwargs,
                            **(options[0] if options else {}))
        reports.append((name, report))
    return reports


def assert_passed(results, cases):
    """Every rank reported every case, and each passed (failures listed with their reports)."""
    assert [len(reports) for reports in results] == [len(cases)] * len(results)
    failures = [f"{name}:\n{report}" for reports in results for name, report in reports
                if not report.passed]
    assert not failures, "\n".join(failures)
