"""Checkpoints with orbax-checkpoint: WORKDIR/checkpoints/<round>/, the last `max_to_keep` kept.

A checkpoint holds the server state (parameters and optimizer state) and anything else the caller puts in the
pytree. Randomness needs no saving: every round's keys derive from the run's seed and the round number
(`fold_in(root, round)`), so a resumed run continues exactly where the interrupted one would have.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed while saving
leaves the previous checkpoints intact. `restore_newest` falls back from a checkpoint that cannot be read (a disk
fault, a truncated file) to the newest one that can, with a warning, and moves the unreadable one to
WORKDIR/checkpoints_unreadable/<round>/ so that it is neither used nor lost.

Fault injection for tests: with the environment variable SPRYJAX_FAULT=kill_before_checkpoint_commit:R, the process
dies (exit code 137, as from kill -9) after the temporary folder of round R's checkpoint is completely written and
before orbax's rename commits it.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import orbax.checkpoint as ocp

from spryjax.errors import one_line, warn

FAULT_ENV = "SPRYJAX_FAULT"


def _killed_before_commit() -> type:
    """The fault hook: orbax's atomic-rename temporary folder, but the process dies instead of committing it.
    (Imported from orbax's internals only when the hook is on.)"""
    from orbax.checkpoint._src.path import atomicity

    class KilledBeforeCommit(atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *args, **kwargs):
            os._exit(137)
    return KilledBeforeCommit


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 2):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._max_to_keep = max_to_keep
        self._manager = self._open()

    def _open(self, *, killed_before_commit: bool = False) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep, create=True,
            temporary_path_class=_killed_before_commit() if killed_before_commit else None))

    def latest_round(self) -> int | None:
        """The round of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, round_: int, tree: Any) -> None:
        if os.environ.get(FAULT_ENV) == f"kill_before_checkpoint_commit:{round_}":
            self._manager.close()
            self._manager = self._open(killed_before_commit=True)
        self._manager.save(round_, args=ocp.args.StandardSave(tree))
        self._manager.wait_until_finished()

    def restore(self, round_: int, like: Any) -> Any:
        """The checkpoint of `round_`, with `like`'s structure (arrays or ShapeDtypeStructs), shardings and dtypes."""
        return self._manager.restore(round_, args=ocp.args.StandardRestore(like))

    def restore_newest(self, like: Any) -> tuple[int, Any]:
        """(round, tree) of the newest checkpoint that can be read, or (0, like) when there is none. Unreadable
        newer ones are moved aside with a warning (see the module docstring)."""
        for round_ in sorted(self._manager.all_steps(), reverse=True):
            try:
                return round_, self.restore(round_, like)
            except Exception as error:  # orbax raises many types for a damaged checkpoint; all mean "unreadable"
                aside = os.path.join(self.workdir, "checkpoints_unreadable", str(round_))
                warn(f"checkpoint of round {round_} in {self.directory} cannot be read ({one_line(error)[:200]}); "
                     f"moved to {aside}, using the one before it")
                self._manager.close()
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(os.path.join(self.directory, str(round_)), aside)
                self._manager = self._open()
        return 0, like

    def close(self) -> None:
        self._manager.close()
