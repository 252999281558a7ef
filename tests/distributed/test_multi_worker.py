"""`QuantileObjectiveModel.fit` under `tf.distribute.MultiWorkerMirroredStrategy`: two worker
processes on 127.0.0.1, started and stopped by the tests (`worker.py`), against one process
that trains on the same global batches; and a worker killed by its pid in the middle of an
epoch, the job restarted from `keras.callbacks.BackupAndRestore`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
TIMEOUT = 300  # seconds for one worker process; a run takes 30 to 60 s on 2 CPU cores


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound together, so that they differ, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for handle in sockets:
            handle.bind(("127.0.0.1", 0))
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def _environment(tf_config: dict | None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["KERAS_BACKEND"] = "tensorflow"
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _start(out: str, *arguments: str, tf_config: dict | None = None) -> subprocess.Popen:
    log = open(out + ".log", "a")  # noqa: SIM115 (closed with the process, in `_finish`)
    return subprocess.Popen(
        [sys.executable, WORKER, "--out", out, *arguments],
        env=_environment(tf_config),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _finish(process: subprocess.Popen, out: str) -> tuple[int, str]:
    """Waits for a worker (killing it after `TIMEOUT`); its exit code and log."""
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    with open(out + ".log") as log:
        return code, log.read()


def _cluster(directory, arguments_by_worker) -> list[tuple[subprocess.Popen, str]]:
    """Starts one worker per entry of `arguments_by_worker` in a fresh cluster."""
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(len(arguments_by_worker))]
    started = []
    for index, arguments in enumerate(arguments_by_worker):
        out = os.path.join(directory, f"worker{index}.npz")
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        process = _start(out, "--strategy", "multi_worker", *arguments, tf_config=config)
        started.append((process, out))
    return started


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """theta and logs of one process trained on the same global batches."""
    out = str(tmp_path_factory.mktemp("single") / "single.npz")
    code, log = _finish(_start(out), out)
    assert code == 0, log[-4000:]
    return dict(np.load(out))


def test_two_workers_give_the_single_process_theta(tmp_path, single_process):
    workers = _cluster(str(tmp_path), [[], []])
    results = []
    for process, out in workers:
        code, log = _finish(process, out)
        assert code == 0, log[-4000:]
        results.append(dict(np.load(out)))
    for result in results:
        np.testing.assert_allclose(result["theta"], single_process["theta"], rtol=1e-5, atol=1e-6)
        for name in ("loss", "hard_objective", "selection_agreement"):
            np.testing.assert_allclose(result[name], single_process[name], rtol=1e-5, atol=1e-6)
            evaluated = f"evaluate_{name}"  # `evaluate` after `fit`, on the same batches
            assert result[evaluated].shape == (), result[evaluated]
            np.testing.assert_allclose(
                result[evaluated], single_process[evaluated], rtol=1e-5, atol=1e-6
            )
        assert int(result["epochs"]) == int(single_process["epochs"])


def test_a_killed_worker_is_reported_and_the_restarted_job_loses_nothing(tmp_path, single_process):
    directory = str(tmp_path)
    backups = [["--backup", os.path.join(directory, f"backup{index}")] for index in range(2)]
    # Worker 1 stops after step 6 of 12 (the middle of the second epoch of 4 steps).
    workers = _cluster(directory, [backups[0], [*backups[1], "--pause-at", "6"]])
    (survivor, survivor_out), (lost, lost_out) = workers
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(lost_out + ".paused"):
        assert lost.poll() is None, _finish(lost, lost_out)[1][-4000:]
        assert time.monotonic() < deadline, "worker 1 never reached step 6"
        time.sleep(0.2)
    with open(lost_out + ".paused") as marker:
        pid = int(marker.read())
    assert pid == lost.pid
    os.kill(pid, signal.SIGKILL)
    assert lost.wait(timeout=60) == -signal.SIGKILL
    # The other worker does not hang on the lost one: it fails with TensorFlow's report.
    code, log = _finish(survivor, survivor_out)
    assert code != 0 and "UnavailableError" in log and "task:1" in log, log[-4000:]
    assert not os.path.exists(survivor_out)

    # The job restarted: both workers resume from their backups, after the first epoch.
    results = []
    for process, out in _cluster(directory, backups):
        code, log = _finish(process, out)
        assert code == 0, log[-4000:]
        results.append(dict(np.load(out)))
    for result in results:
        # Epochs 2 and 3 only (the first was backed up; the interrupted one is run again, once).
        assert int(result["epochs"]) == 2, result
        np.testing.assert_allclose(result["theta"], single_process["theta"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["loss"], single_process["loss"][1:], rtol=1e-5, atol=1e-6)
    for _, backup in backups:  # BackupAndRestore removes its backup when training ends
        assert not os.path.isdir(backup) or not os.listdir(backup), os.listdir(backup)
