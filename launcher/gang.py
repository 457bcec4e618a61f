"""One run over several nodes on Ray: its nodes reserved together as one gang, seated, watched, ended as one.

    gang = RayGang(plan)   # a placement group: one bundle per node (the run's CPUs and GPUs), strictly spread
    gang.poll(view)        # None while it is placed or trains; then the run's outcome (every node's task ended)
    gang.end()             # Ctrl-C: every task cancelled, the placement group removed

Reads as its steps: reserve the nodes together (Ray's placement group holds the run pending until every bundle fits
on a node of its own: never the whole cluster, never half of it) -> once placed, ask rank 0's node for its address
and a free port (known before any rank starts) -> start one task per node in its bundle: machine rank 0 runs
`execute.run_one` (the run's folder, its lock and records), the others `execute.run_node`; each starts its node's
processes through `accelerate launch --num_machines N --machine_rank I --main_process_ip HEAD`, torch's static
rendezvous at the head -> watch: the first node whose task fails ends the gang (the other tasks cancelled, their
processes with them), and so does a meeting that does not complete in `rendezvous_timeout` (naming the nodes whose
launcher never reached the head); the placement group goes either way. The backend retries a failed gang like any run: a new
placement group, which Ray places on the nodes alive then, and the run resumes from its last checkpoint.

Why not Ray Train's TorchTrainer: it runs each rank as a function in a Ray worker and forms the process group
itself, while a tunefleet run is a process tree started by accelerate (DDP or DeepSpeed, warm-forked ranks) that
every backend launches the same way; the gang needs only Ray's gang scheduling, which is the placement group.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunefleet.common.contract import GANG_FILE, GANG_FOLDER, NODE_ID_ENV, TRAIN_LOG, GangSeat
from tunefleet.common.errors import TunefleetError, first_line
from tunefleet.common.status import RunStatus
from tunefleet.common.storage import Store, join
from tunefleet.launcher.execute import run_node, run_one
from tunefleet.launcher.launch import free_port
from tunefleet.launcher.records import RunOutcome, RunPlan

if TYPE_CHECKING:
    from tunefleet.launcher.progress import SweepView


def bundle_of(plan: RunPlan) -> dict[str, float]:
    """What the run takes on each of its nodes: its CPUs, GPUs and memory (resources are per node for a gang)."""
    where = plan.placement
    bundle: dict[str, float] = {"CPU": float(where.cpus)}
    if where.gpus > 0:
        bundle["GPU"] = float(where.gpus)
    if where.memory_gb:
        bundle["memory"] = float(int(where.memory_gb * 2**30))
    return bundle


def nodes_that_fit(bundle: dict[str, float], nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The live nodes (as from ray.nodes()) that could hold `bundle` when idle (pure)."""
    return [
        n
        for n in nodes
        if n.get("Alive", True) and all(n.get("Resources", {}).get(k, 0) >= v - 1e-9 for k, v in bundle.items())
    ]


def check_gang_fits(plan: RunPlan, nodes: list[dict[str, Any]]) -> None:
    """Refuse in one line a run over more nodes than the cluster has that can hold one of its bundles (pure)."""
    bundle, wanted = bundle_of(plan), plan.config.num_nodes
    fit = nodes_that_fit(bundle, nodes)
    if len(fit) < wanted:
        shape = ", ".join(f"{v:g} {k}" for k, v in bundle.items() if k != "memory")
        raise TunefleetError(
            f"run {plan.name} spans {wanted} nodes of {shape} each, but the Ray cluster has {len(fit)} such node(s) "
            f"(of {sum(1 for n in nodes if n.get('Alive', True))} alive): lower num_nodes or add nodes"
        )


def rendezvous_port() -> int:
    """Run on rank 0's node, inside its bundle: a port free there, for the rendezvous torchrun holds at the head."""
    return free_port("")


def run_seat(plan: RunPlan, seat: GangSeat) -> RunOutcome:
    """The Ray task of one node of a gang: rank 0's node runs the run (its folder and records), the others join."""
    env = {NODE_ID_ENV: seat.node_id or ""}
    return run_one(plan, env, seat) if seat.machine_rank == 0 else run_node(plan, seat, env)


def missing_nodes(seats: list[GangSeat], reached: set[int]) -> list[GangSeat]:
    """The seats whose node never reached the head (pure)."""
    return [s for s in seats if s.machine_rank not in reached]


def rendezvous_error(seats: list[GangSeat], reached: set[int], timeout: int) -> str:
    """One line: which nodes did not join in time, or that all reached the head and the process group still did
    not form (pure)."""
    head = f"{seats[0].head}:{seats[0].port}"
    missing = missing_nodes(seats, reached)
    if not missing:
        return (
            f"rendezvous at {head} did not complete in {timeout} s although every node reached it: the ranks could not "
            "connect to each other (set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface the nodes share)"
        )
    named = "; ".join(f"node {s.machine_rank} ({s.host}, {node_name(s)})" for s in missing)
    return (
        f"rendezvous at {head} did not complete in {timeout} s: {named} did not join ({len(missing)} of {len(seats)} "
        "node(s): its launcher never started or cannot reach the head; see its train.node<I>.log)"
    )


def node_name(seat: GangSeat) -> str:
    return f"Ray node {seat.node_id[:12]}" if seat.node_id and len(seat.node_id) > 32 else f"node id {seat.node_id}"


def reached(store: Store, gang_id: str) -> set[int]:
    """The machine ranks of this attempt whose launcher reached the head (their arrival files: execute.py)."""
    prefix = f"{gang_id}-node"
    names = [name.rsplit("/", 1)[-1] for name in store.listdir(GANG_FOLDER)]
    return {int(n[len(prefix) : -len(".json")]) for n in names if n.startswith(prefix) and n.endswith(".json")}


class RendezvousWatch:
    """Whether a gang's processes met (rank 0 wrote gang.json with this attempt's id) within the run's
    rendezvous_timeout; once it has passed without, why (the nodes that did not join). Ray's gang and SLURM's rank-0
    launcher both watch with it."""

    def __init__(self, plan: RunPlan, seats: list[GangSeat]):
        self.plan, self.seats, self.started = plan, seats, time.time()
        self.store = Store(plan.output_dir)
        self.joined = False
        self.why: str | None = None

    def failure(self) -> str | None:
        if self.joined or self.why:
            return self.why
        if (self.store.read_json(GANG_FILE) or {}).get("id") == self.seats[0].gang_id:
            self.joined = True
            return None
        timeout = self.plan.config.rendezvous_timeout
        if time.time() - self.started > timeout:
            self.why = rendezvous_error(self.seats, reached(self.store, self.seats[0].gang_id), timeout)
        return self.why

    def done(self) -> None:
        """The attempt ended: its arrival files go (gang.json and run.json say where the nodes were)."""
        self.store.remove(GANG_FOLDER)


@dataclass
class RayGang:
    """A multi-node run's attempt on Ray (see the module's docstring)."""

    plan: RunPlan
    gang_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    group: Any = None  # the placement group
    ready: Any = None  # its ready() reference
    seats: list[GangSeat] = field(default_factory=lambda: list[GangSeat]())
    tasks: dict[Any, GangSeat] = field(default_factory=lambda: dict[Any, GangSeat]())  # task -> its seat
    ended: dict[int, RunOutcome] = field(default_factory=lambda: dict[int, RunOutcome]())  # machine rank -> outcome
    watch: RendezvousWatch | None = None
    failure: str | None = None
    replaced: int = 0  # placements given up before any rank started (a node that died as it was placed)
    place_at: float = 0.0  # when to place again (Ray may still count the dead node alive for its health checks)

    def __post_init__(self) -> None:
        self.place()

    def place(self) -> None:
        from ray.util.placement_group import placement_group

        n = self.plan.config.num_nodes
        self.group = placement_group(
            [bundle_of(self.plan)] * n, strategy="STRICT_SPREAD", name=f"tunefleet-{self.plan.name}-{self.gang_id}"
        )
        self.ready = self.group.ready()

    @property
    def store(self) -> Store:
        return Store(self.plan.output_dir)

    def seat(self) -> None:
        """Placed: rank 0's node's address first, then one task per node, in its bundle."""
        import ray
        from ray.util.placement_group import placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)

        port = ray.get(ray.remote(rendezvous_port).options(num_cpus=0, scheduling_strategy=in_bundle(0)).remote())
        nodes_of_bundles = placement_group_table(self.group).get("bundles_to_node_id", {})
        nodes = {n["NodeID"]: n for n in ray.nodes()}
        head = nodes[nodes_of_bundles[0]]["NodeManagerAddress"]  # the address the cluster reaches rank 0's node at
        n = self.plan.config.num_nodes
        for i in range(n):
            node_id = nodes_of_bundles.get(i)
            node = nodes.get(node_id) or {}
            host = node.get("NodeName") or node.get("NodeManagerAddress")
            seat = GangSeat(self.gang_id, i, n, head, port, node_id, host)
            self.seats.append(seat)
            where = self.plan.placement
            task = ray.remote(run_seat).options(
                num_cpus=where.cpus,
                num_gpus=where.gpus,
                max_retries=0,  # a node lost ends the gang: the whole gang goes again, never one node alone
                retry_exceptions=False,
                scheduling_strategy=in_bundle(i),
            )
            self.tasks[task.remote(self.plan, seat)] = seat
        self.watch = RendezvousWatch(self.plan, self.seats)

    def poll(self, view: SweepView | None = None) -> RunOutcome | None:
        """Advance the gang; its outcome once every node's task has ended."""
        import ray
        from ray.exceptions import RayError

        if self.group is None:  # waiting to place again
            if time.time() < self.place_at:
                return None
            self.place()
        if not self.seats:
            placed, _ = ray.wait([self.ready], timeout=0)
            if not placed:
                return None
            try:
                self.seat()
            except RayError as exc:  # rank 0's node died as the group was placed there: nothing started, place again
                from ray.util.placement_group import remove_placement_group

                if self.group is not None:
                    remove_placement_group(self.group)
                self.group, self.seats = None, []
                self.replaced += 1
                if self.replaced > 8:  # about four minutes of trying
                    why = f"its nodes could not be reserved: {type(exc).__name__}: {first_line(exc)}"
                    return RunOutcome(
                        self.plan.name, RunStatus.FAILED, join(self.plan.output_dir, TRAIN_LOG), error=why
                    )
                self.place_at = time.time() + min(30.0, 2.0**self.replaced)
                return None
            if view is not None:
                view.set(self.plan.name, RunStatus.RUNNING, f"{len(self.seats)} nodes")
            return None
        pending = [ref for ref in self.tasks if self.tasks[ref].machine_rank not in self.ended]
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        for ref in done:
            seat = self.tasks[ref]
            try:
                outcome = ray.get(ref)
            except RayError as exc:  # its worker or node died
                where = f"node {seat.machine_rank} ({seat.host}, Ray node {(seat.node_id or '?')[:12]})"
                outcome = RunOutcome(
                    self.plan.name,
                    RunStatus.FAILED,
                    join(self.plan.output_dir, TRAIN_LOG),
                    error=f"{where} lost: {first_line(exc)}",
                )
            self.ended[seat.machine_rank] = outcome
            if seat.machine_rank == 0 and outcome.skipped:  # finished before: the other nodes have nothing to join
                self.end()
            elif not outcome.ok and self.failure is None and not self.skipped:
                self.failure = outcome.error or f"node {seat.machine_rank} failed"
                self.end()
        if self.watch and self.failure is None and not self.skipped and len(self.ended) < len(self.seats):
            self.failure = self.watch.failure()
            if self.failure:
                self.end()
        if len(self.ended) < len(self.seats):
            return None
        return self.outcome()

    @property
    def skipped(self) -> bool:
        """Rank 0's node found the run finished before (nothing trains)."""
        return bool(self.ended.get(0) and self.ended[0].skipped)

    def lost_seats(self) -> list[GangSeat]:
        """The seats whose Ray node is no longer alive."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return [s for s in self.seats if s.node_id not in alive]

    def end(self) -> None:
        """Cancel every task still running (their processes end with their workers) and give the nodes back."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for ref, seat in self.tasks.items():
            if seat.machine_rank not in self.ended:
                ray.cancel(ref, force=True)
        if self.group is not None:
            remove_placement_group(self.group)

    def outcome(self) -> RunOutcome:
        """Rank 0's node's outcome (the run's own record), failed with the first failure when there was one; the
        nodes as the gang met (gang.json)."""
        import dataclasses

        from ray.util.placement_group import remove_placement_group

        if self.failure is None and not self.skipped and self.group is not None:
            remove_placement_group(self.group)
        if self.watch:
            self.watch.done()
        first = self.ended.get(0) or RunOutcome(
            self.plan.name, RunStatus.FAILED, join(self.plan.output_dir, TRAIN_LOG)
        )
        lost = self.lost_seats() if self.failure is not None else []
        if lost:  # a node died: that is why, whichever node's task ended first
            named = "; ".join(f"node {s.machine_rank} ({s.host}, Ray node {(s.node_id or '?')[:12]})" for s in lost)
            self.failure = f"{named} lost: the gang ended ({self.failure})"
        met = self.store.read_json(GANG_FILE) or {}
        nodes = (
            met.get("nodes")
            if met.get("id") == self.gang_id
            else [{"machine_rank": s.machine_rank, "host": s.host, "node_id": s.node_id} for s in self.seats]
        )
        if self.skipped:
            return first
        if self.failure is None and all(o.ok for o in self.ended.values()):
            return dataclasses.replace(first, nodes=nodes)
        status = RunStatus.INTERRUPTED if first.status is RunStatus.INTERRUPTED else RunStatus.FAILED
        return dataclasses.replace(
            first,
            status=status,
            error=self.failure,
            nodes=nodes,
            out_of_memory=any(o.out_of_memory for o in self.ended.values()),
        )
