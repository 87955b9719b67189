"""Where an ``--engine ray`` run's work ran: videos decoded per node, batches per model actor.

Counted in the driver from the rows themselves (each row carries the node that decoded it and the
actor, node and batch that classified it: :data:`sfdeploy.scale.stages.WHERE_COLUMNS`), so it
needs neither Ray's state API (``ray list tasks``, which wants ``ray[default]``) nor a dashboard,
and it counts what reached the output: each video once, on the node whose decoding was written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sfdeploy.scale.stages import WHERE_COLUMNS


@dataclass
class Placement:
    """Where a Ray run's work ran (nodes that decoded, actors that classified), counted from the
    rows as they arrive: the run's summary says it, so a lost or idle node shows."""

    decoded: Counter[str] = field(default_factory=Counter)  # node id -> videos written
    batches: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # actor id -> node id -> batch ids
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> words, from :func:`node_names` at the end

    def take(self, row: dict[str, Any], *, written: bool) -> dict[str, Any]:
        """Count ``row``'s where-columns (its decoding only if the row is ``written``: a video
        redone after a lost node counts once) and return the row without them."""
        decode_node, actor, model_node, batch = (row.pop(name, None) for name in WHERE_COLUMNS)
        if written and decode_node is not None:
            self.decoded[decode_node] += 1
        if actor is not None:
            self.batches.setdefault(actor, {}).setdefault(model_node or "", set()).add(batch)
        return row

    def batch_counts(self) -> dict[str, dict[str, int]]:
        """actor id -> node id -> batches it ran there (a restarted actor may move)."""
        return {actor: {node: len(ids) for node, ids in nodes.items()} for actor, nodes in self.batches.items()}

    def describe(self) -> list[str]:
        """Two lines for the run's summary."""
        def node(node_id: str) -> str:
            return f"node {node_id[:8]} ({self.nodes.get(node_id, 'unknown')})"

        decoded = ", ".join(f"{count} on {node(n)}" for n, count in self.decoded.most_common())
        ran = "; ".join(f"actor {actor[:8]} ran " + ", ".join(f"{count} batch(es) on {node(n)}"
                                                              for n, count in nodes.items())
                        for actor, nodes in self.batch_counts().items())
        return [f"decoded {sum(self.decoded.values())} videos: {decoded or 'none'}", f"model: {ran or 'no batch'}"]


def node_names() -> dict[str, str]:
    """Every node the cluster has known this session, lost ones too: id -> 'host, ip[, lost]' (none
    if the head does not answer: the run's own error, if any, is the one to show)."""
    import ray

    try:
        nodes = ray.nodes()
    except (ray.exceptions.RayError, ConnectionError, TimeoutError):
        return {}
    return {n["NodeID"]: f"{n['NodeManagerHostname']}, {n['NodeManagerAddress']}{'' if n['Alive'] else ', lost'}"
            for n in nodes}
