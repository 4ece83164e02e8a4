"""One process of a sweep: the command every launcher backend runs, on one machine or on every host of a pod.

    python -m spryjax.launch.worker --config=FILE[:ARG] --workdir=SWEEP_DIR [--config.field=value ...]
        [--member=NAME ...] [--vectorize=seed,...] [--shard=G/N]
        [--distributed | --coordinator=HOST:PORT --num_processes=N --process_id=I]

It expands the config file's sweep (the same on every host), groups members into jobs (`--vectorize`), keeps the
jobs of its shard (job j runs in shard j mod N: the groups of hosts that run members side by side), and runs each
unfinished job over all devices of all processes joined by JAX's distributed runtime: `--distributed` lets
`jax.distributed.initialize()` discover the cluster (TPU pods, SLURM), the explicit coordinator form serves plain
hosts and processes on loopback. Which members are finished is decided by process 0 (its view of the workdir) and
broadcast, so hosts without a shared filesystem still agree; resuming from checkpoints does need the workdir on
shared storage (a bucket, NFS) on multi-host runs.

A member's workdir gets config.json (every field), metrics.jsonl, checkpoints/ and, when its last round is done,
DONE. A member whose training loss diverges is reported and the sweep goes on; the worker then exits with 1.
"""
from __future__ import annotations

import contextlib
import os

import sys

from absl import flags, logging

from spryjax import main as cli  # --config and --workdir, parsed with the CLI's one-line errors
from spryjax.errors import Diverged, InputError, run_command
from spryjax.launch import jobs as jobs_lib
from spryjax.launch import sweep

FLAGS = flags.FLAGS
cli.define_flags(FLAGS, sys.argv)
flags.DEFINE_multi_string("member", [], "Run only these members (names as in the sweep directory).")
flags.DEFINE_string("vectorize", "", "Comma-separated swept fields to vectorize: members differing only in them run "
                                     "as one vmapped simulation.")
flags.DEFINE_string("shard", "0/1", "G/N: run the jobs j with j mod N == G.")
flags.DEFINE_bool("distributed", False, "Join JAX's distributed runtime, discovering the cluster (TPU, SLURM).")
flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for an explicit multi-process runtime.")
flags.DEFINE_integer("num_processes", None, "Processes of the explicit runtime.")
flags.DEFINE_integer("process_id", None, "This process's index in the explicit runtime.")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard={text}: expected G/N, e.g. 0/2") from None
    if not 0 <= index < count:
        raise InputError(f"--shard={text}: G must be in 0..N-1")
    return index, count


def _agree(values: list[bool]) -> list[bool]:
    """Process 0's values, on every process."""
    import jax
    if jax.process_count() == 1:
        return values
    import numpy as np
    from jax.experimental import multihost_utils
    return [bool(v) for v in multihost_utils.broadcast_one_to_all(np.array(values, dtype=bool))]


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def run_job(job: jobs_lib.Job, config_spec: str, overrides: list[str], *, take_over_lock: bool = False) -> bool:
    """Runs a job's unfinished members (resuming partial ones); False if one diverged. Every member's config is
    checked first, and compared with the one its workdir ran (a finished member relaunched with other values is an
    error, not "done"); process 0 holds each running member's workdir lock."""
    from spryjax.fl import mesh
    from spryjax.runners import federated, workdir as workdir_lib
    main_process = mesh.is_main_process()
    configs = [sweep.resolve(config_spec, m, overrides) for m in job.members]
    for m, c in zip(job.members, configs):
        cli.resolve_experiment(c.get("experiment", "")).check(c)
        if main_process and os.path.exists(os.path.join(m.workdir, workdir_lib.CONFIG_FILE)):
            workdir_lib.compare_with_saved(c, m.workdir)
    done = _agree([sweep.status(m.workdir, sweep.length(c)).state == "done" for m, c in zip(job.members, configs)])
    todo = [(m, c) for m, c, d in zip(job.members, configs, done) if not d]
    if not todo:
        return True
    if len(todo) > 1 and configs[0].experiment != "federated":
        raise InputError(f"--vectorize: experiment {configs[0].experiment!r} cannot be vectorized (only federated)")
    with contextlib.ExitStack() as locks:
        if main_process:
            print(f"== {job.name} ({len(todo)} member{'s' if len(todo) > 1 else ''}) ==", flush=True)
            for m, c in todo:
                sweep.prepare(m.workdir)
                locks.enter_context(workdir_lib.prepared(c, m.workdir, take_over_lock=take_over_lock))
        _barrier(f"spryjax-launch-{job.name}")
        return _run_members(job, todo, federated, main_process)


def _run_members(job, todo, federated, main_process: bool) -> bool:
    try:
        if len(todo) > 1:
            federated.run_federated_vectorized([c for _, c in todo], [m.workdir for m, _ in todo])
        else:
            (m, c), = todo
            cli.resolve_experiment(c.experiment).run(c, m.workdir)
    except Diverged as exc:
        if main_process:
            print(f"{job.name}: {exc}", file=sys.stderr, flush=True)
        return False
    if main_process:
        for m, c in todo:
            sweep.mark_done(m.workdir, sweep.length(c))
    return True


def main() -> int:
    logging.set_verbosity(logging.WARNING)
    if not FLAGS.workdir:
        raise InputError("--workdir is required: the sweep's directory")
    index, count = parse_shard(FLAGS.shard)
    from spryjax.fl import mesh
    if FLAGS.coordinator or FLAGS.distributed:
        mesh.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    spec = FLAGS["config"].config_filename
    if mesh.is_main_process():
        import jax
        print(f"spryjax worker: {jax.process_count()} process{'es' if jax.process_count() > 1 else ''} × "
              f"{jax.local_device_count()} {jax.default_backend()} devices", flush=True)
    members = sweep.expand(spec, FLAGS.workdir)
    if FLAGS.member:
        members = sweep.select(members, FLAGS.member)
    jobs = jobs_lib.plan_jobs(members, jobs_lib.parse_fields(FLAGS.vectorize))[index::count]
    overrides = sweep.config_overrides(sys.argv)
    ok = all([run_job(job, spec, overrides, take_over_lock=FLAGS.take_over_lock) for job in jobs])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_command(lambda: (cli.parse_argv(sys.argv, FLAGS), main())[1], "spryjax.launch.worker"))
