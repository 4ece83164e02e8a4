"""Bad input and faults, met as a user meets them: through the command lines.

Table-driven: every case runs a command line in-process (argv in; exit code and stderr out) against a workdir that
may already hold a finished run, and asserts the exit code, exactly one line on stderr naming the field or file,
no traceback, and that every file already in the workdir is byte-identical afterwards (a case's workdir that did
not exist still does not). A few cases go through subprocesses, as a shell would run them. The fault tests kill
runs (kill -9, a kill between a checkpoint's write and its commit, Ctrl-C), run two at once in one workdir, damage
a checkpoint, and make a run diverge, then check what the next command does. docs/reliability.md describes what
these tests prove; its case count is `len(CASES)`.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest

from spryjax import main as cli
from spryjax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DIGITS = os.path.join(REPO, "configs", "fedavg_digits.py")
CENTRAL = os.path.join(REPO, "configs", "central_digits.py")
DEMO = os.path.join(REPO, "configs", "fwdgrad_demo.py")
COMPARE = os.path.join(REPO, "configs", "default.py")
# The finished runs the cases start from: 2 rounds / 1 epoch, a checkpoint each round / epoch.
FEDERATED_RUN = [f"--config={DIGITS}", "--config.num_rounds=2", "--config.fl.checkpoint_every=1",
                 "--config.fl.eval_every=1"]
CENTRAL_RUN = [f"--config={CENTRAL}", "--config.train.epochs=1"]

BAD_CONFIGS = {
    "no_get_config.py": "import ml_collections\n\ndef config():\n    return ml_collections.ConfigDict()\n",
    "syntax_error.py": "def get_config(:\n",
    "raises.py": "def get_config():\n    raise ValueError('the config refuses')\n",
    "ignored_option.py": (
        "from configs import fedavg_digits\n\ndef get_config():\n    c = fedavg_digits.get_config()\n"
        "    c.algorithm.sigma = 1e-4\n    return c\n"),
    "no_batch_size.py": (
        "from configs import fedavg_digits\n\ndef get_config():\n    c = fedavg_digits.get_config()\n"
        "    del c.algorithm['batch_size']\n    return c\n"),
    "unknown_top_field.py": (
        "from configs import fedavg_digits\n\ndef get_config():\n    c = fedavg_digits.get_config()\n"
        "    c.rounds = 3\n    return c\n"),
    "no_fl.py": (
        "from configs import fedavg_digits\n\ndef get_config():\n    c = fedavg_digits.get_config()\n"
        "    del c['fl']\n    return c\n"),
    "data_not_a_section.py": (
        "import ml_collections\nfrom configs import fedavg_digits\n\ndef get_config():\n"
        "    c = fedavg_digits.get_config().to_dict()\n    c['data'] = 'digits'\n"
        "    return ml_collections.ConfigDict(c)\n"),
    "no_experiment.py": "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'seed': 0})\n",
    "sweep_not_a_list.py": (
        "from configs.fedavg_digits import get_config\n\ndef get_sweep():\n    return {'seed': [0, 1]}\n"),
    "sweep_raises.py": (
        "from configs.fedavg_digits import get_config\n\ndef get_sweep():\n    return [{'seed': 1 / 0}]\n"),
}


class Case(NamedTuple):
    id: str
    argv: tuple[str, ...]     # after the program name; {workdir}, {bad}, {file}, {dir} are filled in
    expect: str               # a substring of the one stderr line (the field or the file it names)
    run: str | None = None    # the finished run the workdir starts as: "federated", "central" or None (absent)
    code: int = 2
    command: str = "main"     # "main" (spryjax.main) or "report"


def federated(id, *overrides, expect, run="federated", code=2):
    return Case(id, (*FEDERATED_RUN, *overrides, "--workdir={workdir}"), expect, run, code)


CASES = [
    # numbers out of range, named by their config path
    federated("num_rounds_zero", "--config.num_rounds=0", expect="config.num_rounds=0: must be an integer ≥ 1"),
    federated("num_rounds_negative", "--config.num_rounds=-3", expect="config.num_rounds=-3"),
    federated("seed_negative", "--config.seed=-1", expect="config.seed=-1"),
    federated("batch_size_zero", "--config.algorithm.batch_size=0", expect="config.algorithm.batch_size=0"),
    federated("batch_size_negative", "--config.algorithm.batch_size=-8", expect="config.algorithm.batch_size=-8"),
    federated("local_epochs_zero", "--config.algorithm.local_epochs=0", expect="config.algorithm.local_epochs=0"),
    federated("learning_rate_nan", "--config.algorithm.client_optimizer.learning_rate=nan",
              expect="config.algorithm.client_optimizer.learning_rate=nan: must be a finite number"),
    federated("learning_rate_inf", "--config.algorithm.client_optimizer.learning_rate=inf",
              expect="config.algorithm.client_optimizer.learning_rate=inf"),
    federated("learning_rate_negative", "--config.algorithm.client_optimizer.learning_rate=-0.1",
              expect="config.algorithm.client_optimizer.learning_rate=-0.1"),
    federated("server_learning_rate_zero", "--config.algorithm.server_optimizer.learning_rate=0",
              expect="config.algorithm.server_optimizer.learning_rate=0"),
    federated("hidden_not_sizes", "--config.model.hidden=(-3,)", expect="config.model.hidden=(-3,)"),
    federated("hidden_string", "--config.model.hidden=abc", expect="config.model.hidden"),
    federated("test_fraction_zero", "--config.fl.test_fraction=0.0", expect="config.fl.test_fraction=0.0"),
    federated("test_fraction_one", "--config.fl.test_fraction=1.0", expect="config.fl.test_fraction=1.0"),
    federated("alpha_zero", "--config.fl.alpha=0", expect="config.fl.alpha=0"),
    federated("alpha_negative", "--config.fl.alpha=-1", expect="config.fl.alpha=-1"),
    federated("client_chunk_size_negative", "--config.fl.client_chunk_size=-1",
              expect="config.fl.client_chunk_size=-1"),
    federated("client_chunk_size_zero", "--config.fl.client_chunk_size=0", expect="config.fl.client_chunk_size=0"),
    federated("eval_clients_negative", "--config.fl.eval_clients=-5", expect="config.fl.eval_clients=-5"),
    federated("max_examples_negative", "--config.fl.max_examples_per_client=-1",
              expect="config.fl.max_examples_per_client=-1"),
    federated("examples_per_client_zero", "--config.fl.examples_per_client=0",
              expect="config.fl.examples_per_client=0"),
    federated("eval_every_negative", "--config.fl.eval_every=-1", expect="config.fl.eval_every=-1"),
    federated("checkpoint_every_negative", "--config.fl.checkpoint_every=-2", expect="config.fl.checkpoint_every=-2"),
    federated("clients_per_round_zero", "--config.fl.clients_per_round=0", expect="config.fl.clients_per_round=0"),
    federated("cohort_above_population", "--config.fl.clients_per_round=101",
              expect="config.fl.clients_per_round=101: more than the config.fl.num_clients=100"),
    federated("num_clients_zero", "--config.fl.num_clients=0", expect="config.fl.num_clients=0"),
    federated("min_examples_zero", "--config.fl.min_examples=0", expect="config.fl.min_examples=0"),
    # names
    federated("unknown_client_optimizer", "--config.algorithm.client_optimizer.name=sgdd",
              expect="config.algorithm.client_optimizer.name: unknown name 'sgdd'"),
    federated("unknown_server_optimizer", "--config.algorithm.server_optimizer.name=fedyogii",
              expect="config.algorithm.server_optimizer.name: unknown name 'fedyogii'"),
    federated("unknown_algorithm", "--config.algorithm.name=fedavgg", expect="config.algorithm.name: unknown name"),
    federated("unknown_model", "--config.model.name=mlpp", expect="config.model.name: unknown name 'mlpp'"),
    federated("unknown_dataset", "--config.data.name=digitz", expect="config.data.name: unknown name 'digitz'"),
    federated("unknown_partition", "--config.fl.partition=random", expect="config.fl.partition='random'"),
    federated("unknown_strategy", "--config.fl.strategy=threads", expect="config.fl.strategy='threads'"),
    federated("unknown_experiment", "--config.experiment=federatedd", expect="config.experiment: unknown"),
    Case("option_of_another_optimizer", (f"--config={REPO}/configs/flow_mnist.py",
                                         "--config.algorithm.client_optimizer.name=adam", "--workdir={workdir}"),
         "config.algorithm.client_optimizer.momentum: not an option of adam"),
    federated("routed_algorithm_on_a_plain_model", "--config.algorithm.name=flow",
              expect="config.model.name='mlp': this algorithm needs a routed model"),
    # fields and flags that do not exist
    federated("unknown_field", "--config.stepz=3", expect="--config.stepz: the config has no field 'stepz'"),
    federated("unknown_algorithm_field", "--config.algorithm.sigma=0.1",
              expect="--config.algorithm.sigma: the config has no field 'sigma'"),
    federated("unknown_flag", "--take_over_lockk", expect="take_over_lockk"),
    federated("positional_argument", "extra", expect="unexpected argument 'extra'"),
    Case("no_config_flag", ("--workdir={workdir}",), "--config is required"),
    Case("config_file_missing", ("--config={dir}/nope.py", "--workdir={workdir}"), "no config file at"),
    Case("config_without_get_config", ("--config={bad}/no_get_config.py", "--workdir={workdir}"),
         "no_get_config.py defines no get_config()"),
    Case("config_syntax_error", ("--config={bad}/syntax_error.py", "--workdir={workdir}"), "syntax_error.py"),
    Case("config_raises", ("--config={bad}/raises.py", "--workdir={workdir}"), "the config refuses"),
    Case("config_method_misspelled", (f"--config={REPO}/configs/spry_rt_minilm.py:spryy", "--workdir={workdir}"),
         "unknown method 'spryy'"),
    Case("option_its_method_ignores", ("--config={bad}/ignored_option.py", "--workdir={workdir}"),
         "config.algorithm.sigma: not an option of fedavg"),
    Case("required_option_missing", ("--config={bad}/no_batch_size.py", "--workdir={workdir}"),
         "config.algorithm.batch_size: required by fedavg"),
    Case("unknown_top_level_field", ("--config={bad}/unknown_top_field.py", "--workdir={workdir}"),
         "config.rounds: not a field of this experiment"),
    Case("section_missing", ("--config={bad}/no_fl.py", "--workdir={workdir}"), "config.fl: required"),
    Case("section_not_a_section", ("--config={bad}/data_not_a_section.py", "--workdir={workdir}"),
         "config.data: must be a section"),
    Case("experiment_missing", ("--config={bad}/no_experiment.py", "--workdir={workdir}"), "config.experiment"),
    # the workdir
    Case("workdir_empty", (*FEDERATED_RUN, "--workdir="), "--workdir: empty"),
    Case("workdir_is_a_file", (*FEDERATED_RUN, "--workdir={file}"), "is a file, not a directory"),
    Case("workdir_under_a_file", (*FEDERATED_RUN, "--workdir={file}/run"), "is a file, so no directory"),
    Case("workdir_cannot_be_created", (*FEDERATED_RUN, "--workdir=/proc/spryjax_run"), "/proc/spryjax_run"),
    Case("workdir_name_too_long", (*FEDERATED_RUN, "--workdir={dir}/" + "r" * 300), "a file system allows at most"),
    # resuming with another config
    federated("resume_changed_learning_rate", "--config.algorithm.client_optimizer.learning_rate=0.05",
              expect="algorithm.client_optimizer.learning_rate: 0.1 → 0.05"),
    federated("resume_changed_seed", "--config.seed=7", expect="seed: 0 → 7"),
    federated("resume_changed_partition", "--config.fl.alpha=0.1", expect="fl.alpha: 0.5 → 0.1"),
    federated("resume_changed_model", "--config.model.hidden=(32,)", expect="model.hidden"),
    federated("branch_from_nowhere", "--branch_from={dir}/nowhere", run=None,
              expect="--branch_from={dir}/nowhere: no checkpoints"),
    federated("branch_into_a_run", "--branch_from={workdir}", expect="already holds a run"),
    # damaged files in the workdir
    federated("config_json_garbage", expect="config.json: not a readable config", run="federated:config_garbage"),
    federated("metrics_garbage_line", expect="metrics.jsonl: line 2 is not a metrics record",
              run="federated:metrics_garbage"),
    # locks
    federated("locked_by_a_live_process", expect="in use by process 1 on this host", run="federated:lock_live"),
    federated("locked_from_another_host", expect="locked by process 4242 on host elsewhere", run="federated:lock_remote"),
    # central and the fwdgrad demo
    Case("central_epochs_zero", (*CENTRAL_RUN, "--config.train.epochs=0", "--workdir={workdir}"),
         "config.train.epochs=0", "central"),
    Case("central_batch_size_zero", (*CENTRAL_RUN, "--config.train.batch_size=0", "--workdir={workdir}"),
         "config.train.batch_size=0", "central"),
    Case("central_unknown_train_field", (*CENTRAL_RUN, "--config.train.epoch=3", "--workdir={workdir}"),
         "--config.train.epoch: the config has no field 'epoch'", "central"),
    Case("central_unknown_optimizer", (*CENTRAL_RUN, "--config.optimizer.name=adamm", "--workdir={workdir}"),
         "config.optimizer.name: unknown name 'adamm'", "central"),
    Case("central_seed_negative", (*CENTRAL_RUN, "--config.seed=-2", "--workdir={workdir}"), "config.seed=-2",
         "central"),
    Case("central_resume_changed_optimizer", (*CENTRAL_RUN, "--config.optimizer.learning_rate=0.5",
                                              "--workdir={workdir}"), "optimizer.learning_rate: 0.01 → 0.5",
         "central"),
    Case("demo_zero_tangents", (f"--config={DEMO}", "--config.num_tangents=(0,)", "--workdir={workdir}"),
         "config.num_tangents=(0,)"),
    Case("demo_batch_too_large", (f"--config={DEMO}", "--config.batch_size=5000", "--workdir={workdir}"),
         "config.batch_size=5000: more than the 1437 training digits"),
    Case("demo_no_steps", (f"--config={DEMO}", "--config.steps=0", "--workdir={workdir}"), "config.steps=0"),
    Case("demo_learning_rate_nan", (f"--config={DEMO}", "--config.learning_rate=nan", "--workdir={workdir}"),
         "config.learning_rate=nan"),
    Case("compare_member_rounds_zero", (f"--config={COMPARE}", "--config.members.spry.num_rounds=0",
                                        "--workdir={workdir}"), "config.members.spry.num_rounds=0"),
    Case("compare_member_batch_zero", (f"--config={COMPARE}", "--config.members.fedavg.algorithm.batch_size=0",
                                       "--workdir={workdir}"), "config.members.fedavg.algorithm.batch_size=0"),
    # spryjax.report
    Case("report_missing_directory", ("{dir}/nowhere",), "no directory", command="report"),
    Case("report_given_a_file", ("{file}",), "is a file", command="report"),
    Case("report_metric_misspelled", ("{workdir}", "--metric=generalized_acuracy"), "--metric=generalized_acuracy",
         "federated", command="report"),
    Case("report_garbage_metrics", ("{workdir}",), "metrics.jsonl: line 2", "federated:metrics_garbage",
         command="report"),
    Case("report_garbage_config", ("{workdir}",), "config.json is not a readable config", "federated:config_garbage",
         command="report"),
    Case("report_no_arguments", (), "the following arguments are required: directory", command="report"),
    Case("report_unknown_flag", ("{workdir}", "--metrik=x"), "unrecognized arguments: --metrik=x", "federated",
         command="report"),
]


@pytest.fixture(scope="module", autouse=True)
def quiet():
    previous = os.environ.get("SPRYJAX_PROGRESS")
    os.environ["SPRYJAX_PROGRESS"] = "0"
    yield
    if previous is None:
        del os.environ["SPRYJAX_PROGRESS"]
    else:
        os.environ["SPRYJAX_PROGRESS"] = previous


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Finished runs to copy into a case's workdir, made once through the command line itself."""
    base = tmp_path_factory.mktemp("finished")
    runs = {"federated": base / "federated", "central": base / "central"}
    assert cli.run_cli(["spryjax", *FEDERATED_RUN, f"--workdir={runs['federated']}"]) == 0
    assert cli.run_cli(["spryjax", *CENTRAL_RUN, f"--workdir={runs['central']}"]) == 0
    return runs


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_configs")
    for name, text in BAD_CONFIGS.items():
        (folder / name).write_text(text)
    return folder


def damage(workdir: str, how: str) -> None:
    """The finished run's workdir, damaged the way a case names."""
    if how == "config_garbage":
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write("{not json")
    elif how == "metrics_garbage":
        path = os.path.join(workdir, "metrics.jsonl")
        lines = open(path).read().splitlines(keepends=True)
        with open(path, "w") as f:
            f.writelines([lines[0], "garbage\n", *lines[1:]])
    elif how in ("lock_live", "lock_remote"):
        holder = {"pid": 1, "host": socket.gethostname()} if how == "lock_live" else {"pid": 4242, "host": "elsewhere"}
        with open(os.path.join(workdir, ".lock"), "w") as f:
            json.dump({**holder, "since": "2026-01-01T00:00:00"}, f)


def snapshot(path: str) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None when `path` does not exist)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def prepare_case(case: Case, tmp_path, finished, bad_configs) -> tuple[list[str], str]:
    workdir = str(tmp_path / "run")
    if case.run:
        name, _, how = case.run.partition(":")
        shutil.copytree(finished[name], workdir)
        if how:
            damage(workdir, how)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a directory\n")
    fill = dict(workdir=workdir, bad=str(bad_configs), file=str(a_file), dir=str(tmp_path))
    return [arg.format(**fill) for arg in case.argv], workdir


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case, tmp_path, finished, bad_configs, capsys):
    argv, workdir = prepare_case(case, tmp_path, finished, bad_configs)
    expect = case.expect.format(workdir=workdir, dir=str(tmp_path))
    before = snapshot(workdir)
    capsys.readouterr()
    code = (cli.run_cli if case.command == "main" else report.run_cli)(["prog", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    assert snapshot(workdir) == before


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert len({(c.argv, c.run, c.command) for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------------------------
# The same path end to end, through subprocesses


def spryjax(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "spryjax.main", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "SPRYJAX_PROGRESS": "0", **(env or {})}, timeout=600, **kwargs)


@pytest.mark.parametrize("args, code, expect", [
    (["--config=configs/fedavg_digits.py", "--config.fl.alpha=-1"], 2, "config.fl.alpha=-1"),
    (["--config=configs/nope.py"], 2, "no config file at"),
    (["--config=configs/fedavg_digits.py", "--workdir="], 2, "--workdir: empty"),
], ids=["bad_value", "missing_config", "empty_workdir"])
def test_subprocess_bad_input(args, code, expect, tmp_path):
    result = spryjax(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and expect in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_launch_and_worker_bad_input(tmp_path, bad_configs):
    """The launcher and its worker answer bad input with one line and exit code 2 too."""
    env = {**os.environ, "SPRYJAX_PROGRESS": "0"}
    cases = [
        (["-m", "spryjax.launch", f"--config={DIGITS}"], "--workdir is required"),
        (["-m", "spryjax.launch", f"--config={DIGITS}", f"--workdir={tmp_path}/s", "--parallel=0"], "--parallel"),
        (["-m", "spryjax.launch", f"--config={bad_configs}/sweep_not_a_list.py", f"--workdir={tmp_path}/s"],
         "get_sweep() must return a list"),
        (["-m", "spryjax.launch", f"--config={bad_configs}/sweep_raises.py", f"--workdir={tmp_path}/s"],
         "get_sweep() failed: division by zero"),
        (["-m", "spryjax.launch.worker", f"--config={DIGITS}", f"--workdir={tmp_path}/s", "--config.seed=-1"],
         "config.seed=-1"),
    ]
    for args, expect in cases:
        result = subprocess.run([PY, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
        errors = [line for line in result.stderr.strip().splitlines() if "error" in line]
        assert result.returncode == 2 and len(errors) == 1 and expect in errors[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_help_lists_the_flags():
    for flag in ("-h", "--help"):
        result = spryjax(flag)
        assert result.returncode == 0 and "--workdir" in result.stdout and "--take_over_lock" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Faults


RUN = ["--config=configs/fedavg_digits.py", "--config.num_rounds=6", "--config.fl.checkpoint_every=2",
       "--config.fl.eval_every=2"]


def final_state(workdir: str, round_: int) -> list[np.ndarray]:
    """The leaves of a checkpoint, read back without knowing its structure."""
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        tree = manager.restore(round_)
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def rounds(workdir: str) -> list[int]:
    return [json.loads(line)["round"] for line in open(os.path.join(workdir, "metrics.jsonl")) if '"round"' in line]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    assert spryjax(*RUN, f"--workdir={workdir}").returncode == 0
    return workdir


def assert_same_final_state(workdir: str, reference: str) -> None:
    assert rounds(workdir) == rounds(reference) == [1, 2, 3, 4, 5, 6]
    for mine, theirs in zip(final_state(workdir, 6), final_state(reference, 6)):
        np.testing.assert_array_equal(mine, theirs)


def test_kill_during_checkpoint_write_then_resume_is_bitwise_equal(tmp_path, uninterrupted):
    workdir = str(tmp_path / "run")
    killed = spryjax(*RUN, f"--workdir={workdir}", env={"SPRYJAX_FAULT": "kill_before_checkpoint_commit:4"})
    assert killed.returncode == 137
    leftovers = os.listdir(os.path.join(workdir, "checkpoints"))
    assert "2" in leftovers and "4" not in leftovers and any("tmp" in name for name in leftovers)
    resumed = spryjax(*RUN, f"--workdir={workdir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over" in resumed.stderr   # the killed run's lock
    assert_same_final_state(workdir, uninterrupted)


@pytest.mark.slow
def test_kill_9_during_a_run_then_resume_is_bitwise_equal(tmp_path, uninterrupted):
    """A real SIGKILL at a moment the test does not choose (after round 3 is logged, while rounds go on)."""
    workdir = str(tmp_path / "run")
    env = {**os.environ, "SPRYJAX_PROGRESS": "0"}
    long_run = [*RUN[:-3], "--config.num_rounds=400", "--config.fl.checkpoint_every=2", "--config.fl.eval_every=2"]
    process = subprocess.Popen([PY, "-m", "spryjax.main", *long_run, f"--workdir={workdir}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(f"{workdir}/metrics.jsonl") and len(rounds(workdir)) >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = spryjax(*RUN, f"--workdir={workdir}")   # num_rounds 400 -> 6: a schedule change, allowed
    assert resumed.returncode == 0, resumed.stderr
    assert_same_final_state(workdir, uninterrupted)


def test_two_runs_in_one_workdir(tmp_path):
    """The second run is refused with the first one's process id; the first finishes untouched."""
    workdir = str(tmp_path / "run")
    first = subprocess.Popen([PY, "-m", "spryjax.main", *RUN[:-3], "--config.num_rounds=300",
                              "--config.fl.checkpoint_every=100", f"--workdir={workdir}"], cwd=REPO,
                             env={**os.environ, "SPRYJAX_PROGRESS": "0"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(workdir, ".lock")):
        time.sleep(0.05)
    second = spryjax(*RUN, f"--workdir={workdir}")
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and f"in use by process {first.pid}" in lines[0], lines
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_unreadable_newest_checkpoint_falls_back(tmp_path, uninterrupted):
    """The newest checkpoint's array data is cut short: the run warns, sets it aside, resumes from the one
    before, trims the metrics to it and ends as the uninterrupted run did."""
    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    newest = os.path.join(workdir, "checkpoints", "6")
    data = max((os.path.join(d, f) for d, _, files in os.walk(newest) for f in files), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    result = spryjax(*RUN, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "checkpoint of round 6" in warnings[0] and "cannot be read" in warnings[0]
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "6"))
    assert_same_final_state(workdir, uninterrupted)


def test_divergence_keeps_finite_checkpoints_and_a_branch_resumes(tmp_path):
    """A sane run, then a branch of it with a learning rate that makes it diverge: exit code 3, one line naming the
    round and the last good checkpoint, every checkpoint finite; a branch of the diverged run with a sane rate
    resumes from that checkpoint and finishes with finite losses."""
    sane = [*RUN[:-3], "--config.fl.checkpoint_every=1", "--config.fl.eval_every=1"]
    first, wild, fixed = (str(tmp_path / name) for name in ("first", "wild", "fixed"))
    assert spryjax(*sane, "--config.num_rounds=3", f"--workdir={first}").returncode == 0
    diverged = spryjax(*sane, "--config.num_rounds=8", "--config.algorithm.client_optimizer.learning_rate=1e30",
                       f"--workdir={wild}", f"--branch_from={first}")
    lines = diverged.stderr.strip().splitlines()
    assert diverged.returncode == 3 and len(lines) == 1, diverged.stderr
    assert "diverged at round 4" in lines[0] and "the last good checkpoint is round 3" in lines[0]
    for step in os.listdir(os.path.join(wild, "checkpoints")):
        assert all(np.all(np.isfinite(leaf)) for leaf in final_state(wild, int(step)))
    resumed = spryjax(*sane, "--config.num_rounds=8", f"--workdir={fixed}", f"--branch_from={wild}")
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in open(os.path.join(fixed, "metrics.jsonl"))]
    assert [r["round"] for r in records if "round" in r] == list(range(1, 9))
    assert {"branched_from": os.path.abspath(wild), "at": 3} in records
    assert all(np.isfinite(r["train_loss"]) for r in records if "round" in r)


def test_ctrl_c_is_one_line_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    long_run = [*RUN[:-3], "--config.num_rounds=2000", "--config.fl.checkpoint_every=5"]
    process = subprocess.Popen([PY, "-m", "spryjax.main", *long_run, f"--workdir={workdir}"], cwd=REPO,
                               env={**os.environ, "SPRYJAX_PROGRESS": "0"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(f"{workdir}/metrics.jsonl") and len(rounds(workdir)) >= 7):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    lines = err.strip().splitlines()
    assert process.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("spryjax: interrupted at round ") and "the same command resumes from round" in lines[0]
    resume_from = int(lines[0].rsplit(" ", 1)[1])
    assert resume_from % 5 == 1 and resume_from > 1
    again = spryjax(*long_run[:-2], "--config.num_rounds=12", "--config.fl.checkpoint_every=5",
                    f"--workdir={workdir}")
    assert again.returncode == 0, again.stderr
    assert rounds(workdir) == list(range(1, 13))


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path, finished):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished["federated"], workdir)
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(os.path.join(workdir, ".lock"), "w") as f:
        json.dump({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "2026-01-01T00:00:00"}, f)
    result = spryjax(*FEDERATED_RUN, f"--workdir={workdir}")
    assert result.returncode == 0
    assert [line for line in result.stderr.splitlines() if "warning" in line][0].endswith("(no longer running)")
    assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_a_schedule_change_is_allowed_and_recorded(tmp_path, finished):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished["federated"], workdir)
    assert cli.run_cli(["spryjax", *FEDERATED_RUN, "--config.num_rounds=3", f"--workdir={workdir}"]) == 0
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {"config_change": {"num_rounds": [2, 3]}, "after_round": 2} in records
    assert rounds(workdir) == [1, 2, 3]
    assert json.load(open(os.path.join(workdir, "config.json")))["num_rounds"] == 3


def test_a_cut_short_final_metrics_line_is_dropped_with_a_warning(tmp_path, finished, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished["federated"], workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"round": 3, "train_lo')
    assert cli.run_cli(["spryjax", *FEDERATED_RUN, "--config.num_rounds=3", f"--workdir={workdir}"]) == 0
    assert "line 4 was cut short" in capsys.readouterr().err   # after the summary and rounds 1, 2
    assert rounds(workdir) == [1, 2, 3]


def test_central_resumes_after_its_newest_epoch(tmp_path, finished):
    """A finished 1-epoch central run extended to 2 epochs trains only epoch 2 and equals a 2-epoch run."""
    extended, direct = str(tmp_path / "extended"), str(tmp_path / "direct")
    shutil.copytree(finished["central"], extended)
    assert cli.run_cli(["spryjax", *CENTRAL_RUN, "--config.train.epochs=2", f"--workdir={extended}"]) == 0
    assert cli.run_cli(["spryjax", *CENTRAL_RUN, "--config.train.epochs=2", f"--workdir={direct}"]) == 0
    epochs = lambda w: [json.loads(line)["epoch"] for line in open(os.path.join(w, "metrics.jsonl"))
                        if '"epoch"' in line]
    assert epochs(extended) == epochs(direct) == [1, 2]
    for mine, theirs in zip(final_state(extended, 2), final_state(direct, 2)):
        np.testing.assert_array_equal(mine, theirs)


def test_the_reliability_guide_states_these_counts():
    text = open(os.path.join(REPO, "docs", "reliability.md")).read()
    main_cases = sum(c.command == "main" for c in CASES)
    assert f"**{len(CASES)} bad inputs**" in text
    assert f"({main_cases} through `spryjax.main`, {len(CASES) - main_cases} through" in text
