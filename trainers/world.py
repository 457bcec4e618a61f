"""A multi-node run's processes meeting, and the record of who is where.

The meeting is torch's: in a run its launcher gave a gang seat (common/contract.py: GangSeat), each rank forms the
process group at the head over the store torchrun's static rendezvous runs there (no rendezvous of tunefleet's own).
Then every rank's host and node are gathered over that group (one collective), and rank 0 writes `gang.json` (what
the backend watching the gang waits for) and keeps the nodes for run.json.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from tunefleet.common.contract import GANG_FILE, gang_seat
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.storage import Store

NODES: list[dict[str, Any]] = []  # this run's nodes once its gang met (run.json: nodes)


def join(output_dir: str) -> list[dict[str, Any]]:
    """Meet the run's other processes (a run with a gang seat only; else nothing): form the process group, gather
    where everyone is. Rank 0 writes gang.json; every rank returns the nodes."""
    seat = gang_seat()
    if seat is None:
        return []
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    me = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "machine_rank": seat.machine_rank,
        "host": seat.host or socket.gethostname(),
        "node_id": seat.node_id,
    }
    store = Store(output_dir)
    if not dist.is_initialized():  # torch's env:// rendezvous, at the head torchrun named (MASTER_ADDR:MASTER_PORT)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    NODES[:] = nodes_of(everyone)
    if rank == 0:
        store.write_json(
            GANG_FILE,
            {"id": seat.gang_id, "world_size": len(everyone), "nodes": NODES, "joined_at": utc_now()},
        )
    return NODES


def nodes_of(ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ranks -> one entry per node, by machine rank: its host, node id and ranks (pure)."""
    nodes: dict[int, dict[str, Any]] = {}
    for r in sorted(ranks, key=lambda r: r["rank"]):
        node = nodes.setdefault(
            r["machine_rank"],
            {"machine_rank": r["machine_rank"], "host": r["host"], "node_id": r["node_id"], "ranks": []},
        )
        node["ranks"].append(r["rank"])
    return [nodes[k] for k in sorted(nodes)]
