"""`python -m spryjax.launch`: a config file's sweep, from a laptop to a pod, in one command.

    python -m spryjax.launch --config=configs/NAME.py[:ARG] --workdir=runs/SWEEP [--config.field=value ...]
        [--backend=local|tpu|slurm|ssh] [--parallel=N] [--vectorize=seed,...] [--dry-run]
      local:  [--processes=P] [--platform=cpu|gpu|tpu] [--devices=D]
      tpu:    --tpu=NAME[,NAME...] --zone=ZONE [--project=P]
      slurm:  --nodes=N [--sbatch_option="--partition=gpu" ...]
      ssh:    --hosts=HOST,HOST,... [--port=PORT] [--ssh_option=...]
      remote: [--python=python] [--remote_dir=DIR]   (default: this directory's path)

The sweep is the config file's `get_sweep()` (see spryjax/launch/sweep.py); every member runs in SWEEP/NAME.
A re-launched sweep skips finished members and resumes interrupted ones from their checkpoints. The local backend
schedules the jobs itself and shows one progress bar over all members' rounds (logs in SWEEP/logs/); the others
start the same worker on every host (see backends.py). `--dry-run` prints the commands and scripts instead of
running them. Then: `python -m spryjax.report runs/SWEEP`.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

from absl import flags, logging

from spryjax import main as cli  # --config and --workdir, parsed with the CLI's one-line errors
from spryjax.errors import InputError, run_command
from spryjax.launch import backends, jobs as jobs_lib, sweep
from spryjax.metrics import progress

FLAGS = flags.FLAGS
cli.define_flags(FLAGS, sys.argv)
flags.DEFINE_enum("backend", "local", ["local", "tpu", "slurm", "ssh"], "Where the sweep runs.")
flags.DEFINE_integer("parallel", 1, "Jobs side by side: local processes, or groups of hosts / TPU slices.")
flags.DEFINE_string("vectorize", "", "Comma-separated swept fields (e.g. seed): members differing only in them run "
                                     "as one vmapped simulation.")
flags.DEFINE_bool("dry_run", False, "Print the commands and scripts, run nothing.")
flags.DEFINE_integer("processes", 1, "local: processes per job, joined into one JAX runtime on loopback.")
flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "local: the devices to pin (default: detected).")
flags.DEFINE_integer("devices", None, "local: devices of this machine to share out (default: detected).")
flags.DEFINE_list("tpu", [], "tpu: TPU VM names, one slice per side-by-side group.")
flags.DEFINE_string("zone", None, "tpu: the TPU's zone.")
flags.DEFINE_string("project", None, "tpu: the Google Cloud project (default: gcloud's).")
flags.DEFINE_integer("nodes", None, "slurm: nodes (one task each).")
flags.DEFINE_multi_string("sbatch_option", [], "slurm: an extra #SBATCH line, e.g. --partition=gpu.")
flags.DEFINE_list("hosts", [], "ssh: the hosts; the first of each group coordinates.")
flags.DEFINE_integer("port", None, "The coordinator's port: ssh (default 12355; group g uses port + g), local "
                                   "--processes (default: a free port; slot g uses port + g).")
flags.DEFINE_multi_string("ssh_option", [], "ssh: an extra ssh argument, e.g. -oBatchMode=yes.")
flags.DEFINE_string("python", None, "The Python on the hosts (default: this one locally, `python` remotely).")
flags.DEFINE_string("remote_dir", None, "Remote backends: the spryjax checkout on the hosts (default: this "
                                        "directory's path).")


def detect_platform() -> str:
    """From JAX_PLATFORMS, else the machine (without importing jax, which would claim the devices)."""
    requested = os.environ.get("JAX_PLATFORMS", "").split(",")[0]
    if requested in ("cpu", "tpu"):
        return requested
    if requested in ("cuda", "gpu") or shutil.which("nvidia-smi"):
        return "gpu"
    if any(name.startswith("accel") for name in os.listdir("/dev")) or os.path.exists("/dev/vfio/0"):
        return "tpu"
    return "cpu"


def detect_devices(platform: str) -> int:
    if platform == "gpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            return len(visible.split(","))
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return max(1, sum(line.startswith("GPU") for line in listing.splitlines()))
    if platform == "tpu":
        return max(1, sum(name.startswith("accel") for name in os.listdir("/dev")))
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_force_host_platform_device_count="):
            return int(flag.split("=")[1])
    return 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sweep:
    """The resolved sweep: members, their configs' num_rounds, jobs, and how to build worker argvs."""

    def __init__(self, config: str, workdir: str, overrides: list[str], vectorize: tuple[str, ...], python: str):
        self.config, self.workdir, self.overrides, self.vectorize, self.python = (
            config, workdir, overrides, vectorize, python)
        self.members = sweep.expand(config, workdir)
        self.rounds = {m.name: sweep.length(sweep.resolve(config, m, overrides)) for m in self.members}
        self.jobs = jobs_lib.plan_jobs(self.members, vectorize)

    def argv(self, shard: tuple[int, int] | None = None, *, members: tuple[str, ...] = (), **runtime) -> list[str]:
        """The worker's argv for a shard of the jobs, or for the named members, and the runtime flags."""
        return backends.worker_argv(self.python, self.config, self.workdir, self.overrides, members=members,
                                    vectorize=self.vectorize, shard=shard, **runtime)

    def status(self, member: sweep.Member) -> sweep.Status:
        return sweep.status(member.workdir, self.rounds[member.name])

    def remaining(self) -> list[jobs_lib.Job]:
        return [j for j in self.jobs if any(self.status(m).state != "done" for m in j.members)]


def describe(s: Sweep) -> str:
    states = [s.status(m) for m in s.members]
    partial = [f"{m.name} from round {st.last_round}" for m, st in zip(s.members, states) if st.state == "partial"]
    counts = {k: sum(st.state == k for st in states) for k in ("done", "partial", "new")}
    text = (f"sweep {s.workdir}: {len(s.members)} members in {len(s.jobs)} jobs; {counts['done']} done, "
            f"{counts['partial']} to resume, {counts['new']} new")
    return text + (f" (resuming {'; '.join(partial)})" if partial else "")


# ----------------------------------------------------------------------------------------------------------------
# local


def run_local(s: Sweep, *, platform: str, devices: int, parallel: int, processes: int, port: int | None,
              dry_run: bool) -> int:
    """Runs the remaining jobs, `parallel` at a time, with one progress bar over all members' rounds."""
    def processes_of(job: jobs_lib.Job, slot: int) -> list[backends.Process]:
        return backends.local_processes(
            s.argv(members=tuple(m.name for m in job.members)), platform=platform, devices=devices,
            parallel=parallel, slot=slot, processes=processes,
            port=(port + slot if port else free_port()) if processes > 1 else None,
            inherited_xla_flags=os.environ.get("XLA_FLAGS", ""))

    queue = s.remaining()
    if dry_run:
        if parallel > 1:
            print(f"# {len(queue)} jobs, {parallel} at a time; a job takes the devices of the slot that frees up "
                  "(slots 0, 1, ... shown in turn)")
        for index, job in enumerate(queue):
            for process in processes_of(job, index % parallel):
                print(process.shell() + (" &" if processes > 1 else ""))
            if processes > 1:
                print("wait")
        return 0
    log_dir = os.path.join(s.workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    rounds_done = lambda: sum(min(s.status(m).last_round, s.rounds[m.name]) if s.status(m).state != "done"
                              else s.rounds[m.name] for m in s.members)
    free_slots, running, failed = list(range(parallel)), [], []
    state = lambda: (rounds_done(), f"members {sum(s.status(m).state == 'done' for m in s.members)}/"
                                    f"{len(s.members)} done" + (f", {len(failed)} failed" if failed else ""))
    shown = state()
    bar = progress(total=sum(s.rounds.values()), initial=shown[0], desc=shown[1])

    def redraw() -> None:
        nonlocal shown
        if state() != shown:   # only on news (a log file would otherwise get a line a second)
            shown = state()
            bar.n = shown[0]
            bar.set_description(shown[1])

    try:
        _schedule(queue, free_slots, running, failed, processes_of, log_dir=log_dir, processes=processes,
                  redraw=redraw)
    finally:   # interrupted (Ctrl-C): stop the jobs; a re-launch resumes them from their checkpoints
        for _, _, procs in running:
            for p, log in procs:
                p.terminate()
                log.close()
    bar.close()
    for job, code in failed:
        log = os.path.join(log_dir, f"{job.name}{'.p0' if processes > 1 else ''}.log")
        with open(log) as f:
            last = ([line.strip() for line in f if line.strip()] or ["(empty log)"])[-1]
        print(f"failed: {job.name} (exit {code}): {last}  [log: {log}]", file=sys.stderr)
    print(f"{shown[1]}. Table: python -m spryjax.report {s.workdir}")
    return 1 if failed else 0


def _schedule(queue, free_slots, running, failed, processes_of, *, log_dir: str, processes: int, redraw) -> None:
    """Starts queued jobs in free slots, collects finished ones (failures with their exit code), until done."""
    while queue or running:
        while queue and free_slots:
            job, slot = queue.pop(0), free_slots.pop(0)
            procs = []
            for i, process in enumerate(processes_of(job, slot)):
                log = open(os.path.join(log_dir, f"{job.name}{f'.p{i}' if processes > 1 else ''}.log"), "a")
                procs.append((subprocess.Popen(process.argv, env={**os.environ, **process.env}, stdout=log,
                                               stderr=subprocess.STDOUT), log))
            running.append((job, slot, procs))
        time.sleep(1.0)
        for entry in list(running):
            job, slot, procs = entry
            if any(p.poll() is None for p, _ in procs):
                continue
            for _, log in procs:
                log.close()
            if any(p.returncode for p, _ in procs):
                failed.append((job, max(p.returncode for p, _ in procs)))
            running.remove(entry)
            free_slots.append(slot)
        redraw()


# ----------------------------------------------------------------------------------------------------------------
# remote


def remote_plan(s: Sweep, *, backend: str, parallel: int) -> tuple[list[list[str]], dict[str, str]]:
    """(commands to run, files to write first) for the tpu, slurm and ssh backends."""
    remote_dir = FLAGS.remote_dir or os.getcwd()
    argv_for_shard = s.argv
    if backend == "tpu":
        if not FLAGS.tpu:
            raise InputError("--backend=tpu needs --tpu=NAME[,NAME...]")
        if parallel not in (1, len(FLAGS.tpu)):
            raise InputError(f"--backend=tpu: side-by-side groups are TPU slices; --parallel={parallel} but "
                             f"{len(FLAGS.tpu)} --tpu names")
        return backends.tpu_commands(argv_for_shard, tpus=FLAGS.tpu, zone=FLAGS.zone, project=FLAGS.project,
                                     remote_dir=remote_dir), {}
    if backend == "slurm":
        if not FLAGS.nodes:
            raise InputError("--backend=slurm needs --nodes=N")
        log_dir = os.path.join(s.workdir, "logs")
        script = backends.slurm_script(argv_for_shard, nodes=FLAGS.nodes, parallel=parallel,
                                       job_name=f"spryjax-{os.path.basename(os.path.normpath(s.workdir))}",
                                       log_dir=log_dir, remote_dir=remote_dir, sbatch_options=FLAGS.sbatch_option)
        path = os.path.join(s.workdir, "launch", "sweep.sbatch")
        return [["sbatch", path]], {path: script}
    if not FLAGS.hosts:
        raise InputError("--backend=ssh needs --hosts=HOST,HOST,...")
    return backends.ssh_commands(argv_for_shard, hosts=FLAGS.hosts, port=FLAGS.port or 12355, parallel=parallel,
                                 remote_dir=remote_dir, ssh_options=FLAGS.ssh_option), {}


def run_remote(s: Sweep, *, backend: str, parallel: int, dry_run: bool) -> int:
    commands, files = remote_plan(s, backend=backend, parallel=parallel)
    if dry_run:
        for path, text in files.items():
            print(f"# {path}\n{text}")
        for command in commands:
            print(shlex.join(command))
        return 0
    for path, text in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    procs = [subprocess.Popen(command) for command in commands]
    return max([p.wait() for p in procs])


def main() -> int:
    logging.set_verbosity(logging.WARNING)
    if not FLAGS.workdir:
        raise InputError("--workdir is required: the sweep's directory, e.g. --workdir=runs/my_sweep")
    local = FLAGS.backend == "local"
    python = FLAGS.python or (sys.executable if local else "python")
    s = Sweep(FLAGS["config"].config_filename, FLAGS.workdir, sweep.config_overrides(sys.argv),
              jobs_lib.parse_fields(FLAGS.vectorize), python)
    if FLAGS.parallel < 1 or FLAGS.processes < 1:
        raise InputError("--parallel and --processes must be ≥ 1")
    print(describe(s), file=sys.stderr)
    if local:
        platform = FLAGS.platform or detect_platform()
        devices = FLAGS.devices or detect_devices(platform)
        return run_local(s, platform=platform, devices=devices, parallel=FLAGS.parallel, processes=FLAGS.processes,
                         port=FLAGS.port, dry_run=FLAGS.dry_run)
    return run_remote(s, backend=FLAGS.backend, parallel=FLAGS.parallel, dry_run=FLAGS.dry_run)


def parse_flags(argv: list[str]) -> list[str]:
    """spryjax.main's parser, also accepting dashes in the launcher's own flag names (--dry-run)."""
    def underscored(arg: str) -> str:
        if not arg.startswith("--") or arg.startswith("--config"):
            return arg
        name, sep, value = arg[2:].partition("=")
        return "--" + name.replace("-", "_") + sep + value
    return cli.parse_argv([argv[0], *map(underscored, argv[1:])], FLAGS)


def run_cli(argv: list[str]) -> int:
    """The launcher, in-process: argv in, exit code out, failures one line on stderr."""
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags: see the docstring above; --helpfull lists every flag with its help.")
        return 0
    return run_command(lambda: (parse_flags(argv), main())[1], "spryjax.launch")


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv))
