"""The host side of a federated run, shared by single runs (`spryjax.fl.simulate`) and vectorized sweeps
(`spryjax.fl.vectorized`): resume from checkpoints, the rounds, their JSONL records, evaluations, checkpoints,
the progress bar and what a non-finite training loss does.

A loop drives M ≥ 1 members (a single run is one member) that advance together, one compiled round for all:

    state, per-member metrics = round_fn(state, r)            r = start + 1, …, num_rounds
    record_m = round r's metrics, bytes, timings (+ evaluation every `eval_every` rounds and at the last round)
    append record_m to member m's WORKDIR/metrics.jsonl; save member m's state every `checkpoint_every` rounds

Resuming: every member's newest readable checkpoint (`Checkpointer.restore_newest`) must be at the same round R
(0 without checkpoints); the loop restores the states, drops the metrics records after R (written by a run
interrupted before its next checkpoint, or all round records when R = 0) and continues from R + 1.

Divergence: a round diverged when its training loss, any of the new server parameters, or (at evaluated rounds) an
evaluation loss is not finite. Its record is written, its state is never checkpointed (so every checkpoint holds
finite parameters), and `LoopOptions.on_divergence` says what follows:
    "stop"          (single runs) `Diverged` names the round and the last good checkpoint.
    "drop_member"   (vectorized sweeps) the member leaves: no more records or checkpoints for it, the others run
                    on; at the end `Diverged` names every member that left.

Ctrl-C raises `Interrupted` naming the round in progress and the round the same command resumes from.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal, NamedTuple, Sequence

from spryjax.checkpoint import Checkpointer
from spryjax.errors import Diverged, InputError, Interrupted
from spryjax.fl.algorithm import Communication
from spryjax.metrics import MetricsWriter, progress, read_metrics

PyTree = Any


class LoopOptions(NamedTuple):
    """The schedule of a run's host loop (see the module docstring)."""
    num_rounds: int
    eval_every: int = 10                    # 0: never evaluate
    checkpoint_every: int | None = None     # None or 0: no checkpoints (and no resuming)
    show_progress: bool = True
    on_divergence: Literal["stop", "drop_member"] = "stop"


class MemberStates(NamedTuple):
    """How the loop reads and writes one member's part of the joint state."""
    split: Callable[[PyTree], list[PyTree]]          # joint state -> one state per member (host or device arrays)
    join: Callable[[list[PyTree]], PyTree]           # one state per member -> joint state, placed for the rounds
    finite: Callable[[PyTree], list[bool]]           # joint state -> whether each member's parameters are finite


def _non_finite(record: dict, params_finite: bool) -> str | None:
    """What of a round turned non-finite ("training loss", "parameters", "<group>_loss"), or None."""
    if not math.isfinite(record.get("train_loss", 0.0)):
        return "training loss"
    if not params_finite:
        return "parameters"
    return next((k for k, v in record.items() if k.endswith("_loss") and isinstance(v, float)
                 and not math.isfinite(v)), None)


def round_record(round_: int, metrics: dict[str, float], communication: Communication, seconds: float) -> dict:
    """A round's JSONL record from the round function's metrics (host floats)."""
    return {"round": round_, **{k: v for k, v in metrics.items() if k.startswith("train_")},
            "comm_down_bytes": communication.down, "comm_up_bytes": communication.up,
            "round_seconds": seconds, "examples_per_s": metrics["examples"] / seconds,
            "client_steps_per_s": metrics["client_steps"] / seconds}


def run_rounds(state: PyTree, round_fn: Callable[[PyTree, int], tuple[PyTree, list[dict]]], *,
               options: LoopOptions, workdirs: Sequence[str | None], communication: Communication,
               summary: dict, evaluate: Callable[[PyTree, int], list[dict]] | None = None,
               members: MemberStates, write: bool = True, desc: str = "rounds"
               ) -> tuple[PyTree, list[list[dict]]]:
    """Runs rounds start + 1 … `options.num_rounds` of M = len(workdirs) members; returns the final joint state and
    each member's round records (those of a resumed run included).

    Args:
      state: the joint initial state (replaced by the checkpoints' when resuming).
      round_fn: (state, round) -> (state, [metrics of member m]) with train_*, examples and client_steps.
      workdirs: each member's metrics.jsonl and checkpoints/ (None: neither).
      communication: bytes per round (the same for every member).
      summary: written first to a new metrics.jsonl (e.g. the compiled cost of one client step).
      evaluate: (state, round) -> [evaluation metrics of member m].
      members: how to split the joint state into members' states, join them back and check them.
      write: False on the processes of a multi-host run other than process 0 (they compute, they do not log).
    """
    writers = [MetricsWriter(w) if (w and write) else None for w in workdirs]
    checkpointers = [Checkpointer(w) if (w and options.checkpoint_every) else None for w in workdirs]
    try:
        start, state = _resume(state, members, workdirs, checkpointers)
        histories = _trim_metrics(start, workdirs, writers)
        for workdir, writer in zip(workdirs, writers):
            if writer and not read_metrics(workdir):
                writer.write(summary)
        state = _rounds(state, round_fn, start, histories, options=options, workdirs=workdirs, writers=writers,
                        checkpointers=checkpointers, communication=communication, evaluate=evaluate,
                        members=members, show=options.show_progress and write, desc=desc)
    finally:
        for checkpointer in checkpointers:
            if checkpointer:
                checkpointer.close()
    return state, histories


def _rounds(state, round_fn, start, histories, *, options, workdirs, writers, checkpointers, communication,
            evaluate, members, show, desc):
    size = len(workdirs)
    bar = progress(total=options.num_rounds, initial=start, desc=desc) if show else None
    run_start = time.perf_counter() - max((h[-1]["wall_time"] for h in histories if h), default=0.0)
    last_good = [start if (c and start) else None for c in checkpointers]
    diverged: dict[int, tuple[int, str]] = {}   # member -> (the round it diverged at, what was not finite)
    in_progress = start + 1
    try:
        for round_ in range(start + 1, options.num_rounds + 1):
            in_progress = round_
            tick = time.perf_counter()
            state, metrics = round_fn(state, round_)
            seconds = time.perf_counter() - tick
            records = [round_record(round_, m, communication, seconds) for m in metrics]
            if evaluate and (round_ % options.eval_every == 0 or round_ == options.num_rounds):
                for record, result in zip(records, evaluate(state, round_)):
                    record.update(result)
            finite = members.finite(state)
            checkpoint_due = options.checkpoint_every and (round_ % options.checkpoint_every == 0
                                                           or round_ == options.num_rounds)
            states = members.split(state) if checkpoint_due else None
            for m, record in enumerate(records):
                if m in diverged:
                    continue
                record["wall_time"] = time.perf_counter() - run_start
                if writers[m]:
                    writers[m].write(record)
                reason = _non_finite(record, finite[m])
                if reason:
                    diverged[m] = (round_, reason)
                    continue
                histories[m].append(record)
                if checkpoint_due and checkpointers[m]:
                    checkpointers[m].save(round_, states[m])
                    last_good[m] = round_
            if diverged and options.on_divergence == "stop":
                break
            if bar:
                shown = [(k, sum(r[k] for r in records) / size) for k in ("train_loss", "generalized_accuracy")
                         if k in records[0]]
                prefix = "mean " if size > 1 else ""
                bar.set_postfix({f"{prefix}{k.replace('generalized_', 'gen_')}": f"{v:.4f}" for k, v in shown})
                bar.update()
            if len(diverged) == size:
                break
    except KeyboardInterrupt:
        resume = 1 + min((r or 0) for r in last_good)
        raise Interrupted(f"interrupted at round {in_progress}; the same command resumes from round {resume}"
                          ) from None
    finally:
        if bar:
            bar.close()
    if diverged:
        raise Diverged(_divergence_message(diverged, workdirs, checkpointers, last_good))
    return state


def _divergence_message(diverged: dict[int, tuple[int, str]], workdirs, checkpointers, last_good) -> str:
    """One line: which member diverged at which round and how, and its last good checkpoint."""
    parts = []
    for m, (round_, reason) in sorted(diverged.items()):
        kept = (f"the last good checkpoint is round {last_good[m]} in {checkpointers[m].directory}"
                if last_good[m] is not None else "no checkpoint was saved")
        who = "" if len(workdirs) == 1 else f"member {m} ({workdirs[m] or m}) "
        parts.append(f"{who}diverged at round {round_} (non-finite {reason}); {kept}")
    others = "" if len(workdirs) == 1 else "; the other members finished"
    return "; ".join(parts) + others


def _resume(state, members: MemberStates, workdirs, checkpointers) -> tuple[int, PyTree]:
    """The common round the members resume from (0: the start) and the joint state there."""
    if not any(checkpointers):
        return 0, state
    restored = [c.restore_newest(s) if c else (0, s) for c, s in zip(checkpointers, members.split(state))]
    rounds = sorted({r for r, _ in restored})
    if len(rounds) > 1:
        raise InputError("vectorized sweep: the members' checkpoints are at different rounds "
                         f"({', '.join(map(str, rounds))}); run them without vectorizing to resume them")
    start = rounds[0]
    return start, (members.join([tree for _, tree in restored]) if start else state)


def _trim_metrics(start: int, workdirs, writers) -> list[list[dict]]:
    """Drops each member's round records after `start` and returns those up to it."""
    histories = []
    for workdir, writer in zip(workdirs, writers):
        if writer:
            writer.truncate_after("round", start)
        records = read_metrics(workdir) if (workdir and start) else []
        histories.append([r for r in records if 0 < r.get("round", 0) <= start])
    return histories
