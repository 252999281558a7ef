"""The command-line demo, end to end with small options."""

import os
import re

import pytest

from keras_softquantile.__main__ import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    logdir = os.fspath(tmp_path / "runs")
    code = main(
        [
            "demo",
            "--n",
            "40",
            "--features",
            "4",
            "--instances",
            "8",
            "--epochs",
            "3",
            "--epsilon",
            "0.05",
            "--seed",
            "1",
            "--logdir",
            logdir,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"through tf\.argsort\s+norm 0\.0\b", out), out
    assert re.search(r"through tf\.math\.top_k\s+norm 0\.0\b", out), out
    rows = dict(
        re.findall(r"\| (start|after training|planted theta\*|least squares) \| (\S+) \|", out)
    )
    assert set(rows) == {"start", "after training", "planted theta*", "least squares"}, out
    assert float(rows["after training"]) < float(rows["start"])
    assert logdir in out
    for run in ("train", "selection"):
        assert os.listdir(os.path.join(logdir, run)), run


def test_demo_with_the_order_dependent_objective(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--n",
            "16",
            "--features",
            "3",
            "--instances",
            "4",
            "--epochs",
            "2",
            "--objective",
            "rank_weighted_spread",
            "--logdir",
            os.fspath(tmp_path),
        ]
    )
    assert code == 0
    assert "output='sorted'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--n", "0"], "--n: must be a positive integer. Received: 0"),
        (["demo", "--epsilon", "-1"], "--epsilon: must be a number > 0. Received: -1"),
        (["demo", "--quantile", "0.7"], r"--quantile: must lie in \(0, 0.5\]. Received: 0.7"),
        (["demo", "--objective", "sharpe"], "invalid choice: 'sharpe'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
