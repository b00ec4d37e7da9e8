"""The order services start and stop in, from their `requires` (systemd's Requires= and After=).

Checked before anything starts: every name a spec requires is one of the
specs or a service running already, no name is given twice, and nothing
requires itself through a cycle.
"""

from __future__ import annotations

import graphlib
from collections.abc import Collection, Sequence

from .spec import ServiceSpec

__all__ = ["check_order"]


def check_order(specs: Sequence[ServiceSpec], running: Collection[str]) -> None:
    """Check that `specs` can start in dependency order, beside the `running` services' names.

    Raises:
        ValueError: two specs have one name, a spec requires a name that
            is neither among them nor running, or some require each other
            in a cycle (the message names it).
    """
    names: set[str] = set()
    for spec in specs:
        if spec.name in names:
            raise ValueError(
                f"two services are named {spec.name!r}; give each a name of its own (name=...)"
            )
        names.add(spec.name)
    for spec in specs:
        for required in spec.requires:
            if required not in names and required not in running:
                raise ValueError(
                    f"service {spec.name!r} requires {required!r}, which is neither among "
                    "the services started together nor running in the group"
                )
    graph = {spec.name: [r for r in spec.requires if r in names] for spec in specs}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(reversed(exc.args[1]))
        raise ValueError(
            f"services require each other in a cycle ({cycle}): none of them could start first"
        ) from None
