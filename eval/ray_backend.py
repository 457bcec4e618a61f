"""Score shards on Ray: one actor per worker slot (a GPU, a fraction of one, or a CPU), each loading the
base model once; shards are handed out as workers free up; a failed shard is retried on a fresh actor.
"""

from __future__ import annotations

from tunefleet.common.raycluster import ensure_ray
from tunefleet.eval.plan import Task
from tunefleet.eval.progress import shard_progress
from tunefleet.eval.settings import EvalData, EvalSettings
from tunefleet.eval.worker import Scorer, ShardResult

MAX_RETRIES = 2


def run_shards_ray(
    base: str,
    data_spec: EvalData,
    settings: EvalSettings,
    targets: dict[str, str | None],
    work: list[list[Task]],
    address: str | None,
    progress: bool,
) -> list[ShardResult]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    started = ensure_ray(address)
    try:
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        judge = settings.reward_model_gpus if data_spec.reward_model else 0.0  # loaded beside the base
        per_worker = min(1.0, settings.gpus_per_worker + judge) if gpus else 0
        slots = int(gpus / per_worker) if gpus else int(resources.get("CPU", 1))
        n_actors = max(1, min(settings.shards, len(work), slots))
        # spread the workers over the nodes: each loads the base once and scores its shards where it is
        opts = {"num_cpus": 1, "num_gpus": per_worker, "max_restarts": 0, "scheduling_strategy": "SPREAD"}
        remote_scorer = ray.remote(Scorer)

        def new_actor():
            return remote_scorer.options(**opts).remote(
                base, data_spec, settings.batch_size, settings.trust_remote_code
            )

        actors = [new_actor() for _ in range(n_actors)]
        queue = list(range(len(work)))
        attempts = [0] * len(work)
        out: list[ShardResult | None] = [None] * len(work)
        inflight = {}

        def submit(actor):
            if queue:
                idx = queue.pop(0)
                inflight[actor.run.remote(targets, work[idx])] = (actor, idx)

        for actor in actors:
            submit(actor)
        with shard_progress(progress, len(work)) as advance:
            while inflight:
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, idx = inflight.pop(ref)
                try:
                    out[idx] = ray.get(ref)
                    advance()
                except (RayActorError, RayTaskError) as exc:
                    attempts[idx] += 1
                    if attempts[idx] <= MAX_RETRIES:
                        queue.insert(0, idx)
                    else:
                        reason = str(exc).strip().splitlines()[0]
                        message = f"shard failed {attempts[idx]} times: {reason}"
                        out[idx] = ShardResult(errors={t.target: message for t in work[idx]})
                        advance()
                    ray.kill(actor)
                    actor = new_actor()
                submit(actor)
        return [result for result in out if result is not None]  # every shard ends with a result or an error
    finally:
        if started:
            ray.shutdown()
