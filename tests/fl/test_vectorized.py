"""Vectorized sweeps (spryjax.fl.vectorized via runners.federated.run_federated_vectorized) against the same members run alone: same
metrics records (to float tolerance), same final parameters; fields that cannot be vectorized fail in one line;
(slow) an interrupted vectorized run resumes."""
import os
import shutil

import jax
import numpy as np
import pytest

from spryjax.errors import InputError
from spryjax.runners import federated
from spryjax.launch import sweep
from spryjax.metrics import read_metrics

CONFIG = "configs/fedavg_digits.py"
# Small and quick: 2 rounds of 8 clients (one chunk), evaluation on 16 clients at the last round. 60 clients of 25
# examples keep 20 for training: run alone they are padded to 32 rows (4 steps of 8), vectorized to 24 (3 steps).
COMMON = ["--config.num_rounds=2", "--config.fl.clients_per_round=8", "--config.fl.eval_every=2",
          "--config.fl.eval_clients=16", "--config.fl.strategy=chunked", "--config.fl.checkpoint_every=0",
          "--config.fl.num_clients=60", "--config.fl.examples_per_client=25"]


def configs(*overrides):
    return [sweep.resolve(CONFIG, sweep.Member(sweep.member_name(o), o, ""), COMMON) for o in overrides]


def rounds(workdir):
    return [r for r in read_metrics(workdir) if "round" in r]


def test_vectorized_equals_members_run_alone(tmp_path):
    """Seeds and the client learning rate vectorized; data, partition, init, cohorts and keys all differ."""
    members = [{"seed": 0, "algorithm.client_optimizer.learning_rate": 0.1},
               {"seed": 1, "algorithm.client_optimizer.learning_rate": 0.05}]
    cfgs = configs(*members)
    alone = [federated.run_federated(c, str(tmp_path / f"alone{i}")) for i, c in enumerate(cfgs)]
    together = federated.run_federated_vectorized(cfgs, [str(tmp_path / f"vec{i}") for i in range(len(cfgs))])
    for i, (a, v) in enumerate(zip(alone, together)):
        for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(v.state.params)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-5, atol=1e-6)
        logged_alone, logged_vec = rounds(tmp_path / f"alone{i}"), rounds(tmp_path / f"vec{i}")
        assert [r["round"] for r in logged_vec] == [1, 2]
        for ra, rv in zip(logged_alone, logged_vec):
            assert set(ra) == set(rv)
            for key in ("train_loss", "examples", "generalized_loss", "generalized_accuracy"):
                if key in ra:
                    np.testing.assert_allclose(rv[key], ra[key], rtol=2e-5)
    # the members really differ (otherwise equality above would prove little)
    assert not np.allclose(jax.tree.leaves(together[0].state.params)[0],
                           jax.tree.leaves(together[1].state.params)[0])


@pytest.mark.parametrize("override, message", [
    ({"model.hidden": (32,)}, "model.hidden"),
    ({"fl.clients_per_round": 4}, "fl.clients_per_round"),
    ({"algorithm.client_optimizer.name": "adam"}, "only numeric"),
])
def test_fields_that_cannot_be_vectorized(override, message):
    with pytest.raises(InputError, match=message):
        federated.vectorizable_difference(configs({"seed": 0}, {"seed": 1, **override}))


def test_untraceable_hyperparameter_is_one_line_error(tmp_path):
    """local_epochs sets a loop length: tracing it fails, named in an InputError."""
    cfgs = configs({"algorithm.local_epochs": 1}, {"algorithm.local_epochs": 2})
    with pytest.raises(InputError, match="algorithm.local_epochs"):
        federated.run_federated_vectorized(cfgs, [str(tmp_path / "a"), str(tmp_path / "b")])


@pytest.mark.slow
def test_vectorized_resume_equals_uninterrupted(tmp_path):
    """Killed after round 1's checkpoints (round 2's gone, its metrics lines left): the re-run resumes every member
    from round 1 and ends with the uninterrupted run's parameters and records."""
    cfgs = configs({"seed": 0}, {"seed": 1})
    for c in cfgs:
        c.fl.checkpoint_every = 1
    workdirs = [str(tmp_path / f"vec{i}") for i in range(len(cfgs))]
    first = federated.run_federated_vectorized(cfgs, workdirs)
    logged = [rounds(w) for w in workdirs]
    for w in workdirs:
        shutil.rmtree(os.path.join(w, "checkpoints", "2"))
    resumed = federated.run_federated_vectorized(cfgs, workdirs)
    for a, b, w, records in zip(first, resumed, workdirs, logged):
        for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        again = rounds(w)
        assert [r["round"] for r in again] == [1, 2] and again[0] == records[0]
        np.testing.assert_allclose(again[1]["train_loss"], records[1]["train_loss"], rtol=1e-6)
