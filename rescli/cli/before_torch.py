"""What a command settles before the library imports torch: OpenMP reads its settings once, as torch loads."""

from __future__ import annotations

import rescli.cli.console as console


def threads_for_load() -> None:
    """Fewer threads, waiting passively, when other programs keep the CPUs busy (rescli.core.cpus)."""
    from rescli.core.cpus import adapt_to_load

    plan = adapt_to_load()
    if plan is not None and plan.threads is not None:
        console.info(plan.describe())
