"""A run's directory, prepared before anything is written to it:

1. The path can hold a run: not empty, not a file, not under a file, every name ≤ 255 bytes, writable.
2. A lock, WORKDIR/.lock, holding the owner's process id, host and start time (JSON). A second run gets one line
   naming the holder. A lock left by a process that no longer runs on this host (kill -9) is taken over with a
   warning; a lock from another host is not (its process cannot be seen from here): `--take_over_lock` takes it
   over once its run is known to be gone. The lock is removed when the run ends, however it ends.
3. A resumed run's config is compared with WORKDIR/config.json. Only the schedule may change (`SCHEDULE_FIELDS`:
   how long the run goes on, how often it evaluates and checkpoints, which clients evaluation covers); each such
   change is recorded in metrics.jsonl as {"config_change": {field: [old, new]}, "after_round"/"after_epoch": N}.
   Any other change is an error naming the fields: a run's record must say what ran. To change anything else,
   start a new run in a new workdir.
4. config.json is (re)written only then, with the run's complete config.

To continue a run's state with another config (a lower learning rate after a divergence), branch:
`--workdir=NEW --branch_from=OLD` starts NEW from OLD's newest readable checkpoint (copied, with OLD's metrics up
to it and a record {"branched_from": OLD, "at": N}); NEW keeps its own config.json.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
from typing import Any, Iterator

from spryjax.errors import InputError, one_line, warn
from spryjax.metrics import MetricsWriter, flatten, read_metrics, save_config

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
# Fields a resumed run may change (dotted paths, matched at the end: "members.spry.num_rounds" counts too).
SCHEDULE_FIELDS = ("num_rounds", "fl.eval_every", "fl.checkpoint_every", "fl.eval_clients", "train.epochs",
                   "train.eval_every_steps")


def check_path(workdir: str) -> None:
    """An InputError naming --workdir when `workdir` cannot hold a run (see the module docstring)."""
    if not workdir or not workdir.strip():
        raise InputError("--workdir: empty; give a directory")
    too_long = next((part for part in workdir.split(os.sep) if len(part.encode()) > 255), None)
    if too_long is not None:
        raise InputError(f"--workdir: the name {too_long[:40]}… has {len(too_long.encode())} bytes; a file system "
                         "allows at most 255 per name")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise InputError(f"--workdir={workdir}: is a file, not a directory")
    parent = os.path.abspath(workdir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"--workdir={workdir}: {parent} is a file, so no directory can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--workdir={workdir}: {parent} is not writable")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # it exists, under another user
    return True


@contextlib.contextmanager
def locked(workdir: str, *, take_over: bool = False) -> Iterator[None]:
    """Holds WORKDIR/.lock for the duration (see the module docstring)."""
    path = os.path.join(workdir, LOCK_FILE)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                warn(f"{path} is unreadable (a run killed while taking it); taking it over")
            elif holder["host"] == mine["host"] and _process_alive(holder["pid"]):
                raise InputError(f"--workdir={workdir}: in use by process {holder['pid']} on this host since "
                                 f"{holder['since']}; wait for it to end or choose another --workdir") from None
            elif holder["host"] != mine["host"] and not take_over:
                raise InputError(f"--workdir={workdir}: locked by process {holder['pid']} on host {holder['host']} "
                                 f"since {holder['since']}; if that run is gone, pass --take_over_lock") from None
            else:
                warn(f"taking over {path} from process {holder['pid']} on {holder['host']} "
                     f"({'no longer running' if holder['host'] == mine['host'] else '--take_over_lock'})")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    with os.fdopen(fd, "w") as f:
        json.dump(mine, f)
    try:
        yield
    finally:
        if (_read_lock(path) or {}).get("pid") == mine["pid"]:
            os.unlink(path)


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if {"pid", "host", "since"} <= set(holder) else None
    except (OSError, ValueError, TypeError):
        return None


def _is_schedule(field: str) -> bool:
    return any(field == s or field.endswith("." + s) for s in SCHEDULE_FIELDS)


def compare_with_saved(config, workdir: str) -> dict[str, list]:
    """The schedule fields in which `config` differs from WORKDIR/config.json ({} when there is none); an
    InputError naming the fields when any other field differs (see the module docstring)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = flatten(json.load(f))
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{path}: not a readable config ({one_line(error)}); move it away to start over") from None
    now = flatten(json.loads(json.dumps(config.to_dict(), default=str)))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    fixed = [k for k in changed if not _is_schedule(k)]
    if fixed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in fixed[:3])
        raise InputError(f"--workdir={workdir}: the run there used another config ({shown}"
                         f"{', …' if len(fixed) > 3 else ''}); only {', '.join(SCHEDULE_FIELDS)} may change "
                         f"when resuming; start a new run in a new --workdir (--branch_from={workdir} to continue "
                         "from its state)")
    return {k: [saved.get(k), now.get(k)] for k in changed}


def save_checked_config(config, workdir: str) -> None:
    """`compare_with_saved`, a metrics record of the schedule changes, then config.json."""
    changes = compare_with_saved(config, workdir)
    if changes:
        MetricsWriter(workdir).write({"config_change": changes, **_progress(workdir)})
    save_config(config, workdir)


def _progress(workdir: str) -> dict[str, Any]:
    """{"after_round": R} or {"after_epoch": E}: how far the metrics of the run in `workdir` go."""
    records = read_metrics(workdir)
    for key in ("round", "epoch"):
        done = [r[key] for r in records if key in r]
        if done:
            return {f"after_{key}": max(done)}
    return {}


def _branch_point(source: str, workdir: str) -> int:
    """The newest checkpoint round of the run in `source`, checked to be a place to branch from into `workdir`."""
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        raise InputError(f"--branch_from: --workdir={workdir} already holds a run; branch into a new directory")
    folder = os.path.join(source, "checkpoints")
    steps = sorted((int(d) for d in os.listdir(folder) if d.isdigit()), reverse=True) if os.path.isdir(folder) else []
    if not steps:
        raise InputError(f"--branch_from={source}: no checkpoints there to continue from")
    return steps[0]


def branch(source: str, workdir: str, newest: int) -> None:
    """Copies the checkpoint of round `newest` of the run in `source` and its metrics up to it into the new run's
    `workdir` (see the module docstring)."""
    shutil.copytree(os.path.join(source, "checkpoints", str(newest)), os.path.join(workdir, "checkpoints",
                                                                                     str(newest)))
    key = "round" if any("round" in r for r in read_metrics(source)) else "epoch"
    writer = MetricsWriter(workdir)
    for record in read_metrics(source):
        if record.get(key, 0) <= newest and "config_change" not in record:
            writer.write(record)
    writer.write({"branched_from": os.path.abspath(source), "at": newest})


@contextlib.contextmanager
def prepared(config, workdir: str, *, take_over_lock: bool = False, branch_from: str | None = None
             ) -> Iterator[None]:
    """The workdir checked, created, locked and holding the checked config.json for the duration of the run."""
    check_path(workdir)
    newest = _branch_point(branch_from, workdir) if branch_from else None
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise InputError(f"--workdir={workdir}: cannot be created ({one_line(error)})") from None
    with locked(workdir, take_over=take_over_lock):
        if branch_from:
            branch(branch_from, workdir, newest)
        save_checked_config(config, workdir)
        yield
