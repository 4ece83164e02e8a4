"""The report against hand-computed means and stds over synthetic run directories."""
import csv
import json
import os

import numpy as np
import pytest

from spryjax import report
from spryjax.errors import InputError


def write_run(directory, *, method, alpha, seed, accuracies, memory=2**20):
    os.makedirs(directory)
    config = {"seed": seed, "method": method, "algorithm": {"name": method, "lr": 0.1},
              "fl": {"alpha": alpha, "num_clients": 10}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"summary": "client_step", "total_bytes": memory}) + "\n")
        for r, acc in enumerate(accuracies, start=1):
            f.write(json.dumps({"round": r, "train_loss": 1.0 / r, "comm_up_bytes": 2048, "wall_time": float(r),
                                "generalized_accuracy": acc}) + "\n")


@pytest.fixture
def sweep_dir(tmp_path):
    final = {("spry", 0.1): [0.5, 0.6, 0.7], ("spry", 1.0): [0.8, 0.8, 0.9], ("fedavg", 0.1): [0.4, 0.45, 0.5]}
    for (method, alpha), values in final.items():
        for seed, value in enumerate(values):
            write_run(tmp_path / f"{method},seed={seed},fl.alpha={alpha}", method=method, alpha=alpha, seed=seed,
                      accuracies=[0.1, value], memory=(4 if method == "spry" else 8) * 2**20)
    os.makedirs(tmp_path / "logs")   # launcher logs are not runs
    return tmp_path, final


def test_sweep_table_means_stds_and_files(sweep_dir, capsys):
    directory, final = sweep_dir
    paths = report.report(str(directory))
    runs = report.find_runs(str(directory))
    assert len(runs) == 9
    # method implies algorithm.name, which is therefore not a separate column; seed is what rows average over
    assert report.swept_fields(runs) == ["method", "fl.alpha"]
    with open(paths["csv"]) as f:
        rows = {(r["method"], float(r["fl.alpha"])): r for r in csv.DictReader(f)}
    for key, values in final.items():
        assert int(rows[key]["seeds"]) == 3
        np.testing.assert_allclose(float(rows[key]["generalized_accuracy_mean"]), np.mean(values))
        np.testing.assert_allclose(float(rows[key]["generalized_accuracy_std"]), np.std(values, ddof=1))
    assert float(rows[("spry", 0.1)]["client_step_MiB"]) == 4.0
    assert float(rows[("fedavg", 0.1)]["up_KiB_per_round"]) == 2.0
    table = open(paths["markdown"]).read()
    assert "| spry | 0.1 | 3 | 2 | 0.6000 ± 0.1000 |" in table and table in capsys.readouterr().out
    for key in ("curves", "memory"):
        assert os.path.getsize(paths[key]) > 1000


def test_single_run_and_empty_directory(tmp_path):
    write_run(tmp_path / "run", method="spry", alpha=1.0, seed=0, accuracies=[0.2, 0.3])
    paths = report.report(str(tmp_path / "run"), out=str(tmp_path / "out"))
    assert "| 1 | 2 | 0.3000 |" in open(paths["markdown"]).read()
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InputError, match="no run"):
        report.report(str(tmp_path / "empty"))
    assert report.run_cli(["report", str(tmp_path / "missing")]) == 2
