"""Processes and ranks (glm_ft.dist): one definition of rank 0, the launcher's arguments, the shared run folder.

The env:// variables are set as torchrun, the deepspeed launcher and submitit set them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from glm_ft import dist

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "GLM_FT_LAUNCH_STOP")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("env, rank_zero", [
    ({}, True),                                   # python train.py
    ({"RANK": "0", "WORLD_SIZE": "2"}, True),     # torchrun, first process
    ({"RANK": "1", "WORLD_SIZE": "2"}, False),    # torchrun, second process
    ({"RANK": "3", "WORLD_SIZE": "1"}, True),     # a lone process with a RANK left over from a shell
    ({"RANK": "0", "WORLD_SIZE": "1"}, True),     # the one-process DeepSpeed group
])
def test_one_definition_of_rank_zero(monkeypatch, env, rank_zero):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dist.is_rank_zero() is rank_zero
    assert dist.is_multi_process() is (int(env.get("WORLD_SIZE", "1")) > 1)


def test_the_writers_of_a_run_agree_on_rank_zero():
    """Training's records, MLflow and the sweep parent all ask glm_ft.dist: no module reads RANK itself."""
    root = os.path.dirname(dist.__file__)
    readers = subprocess.run(["grep", "-rln", "--include=*.py", 'environ.get("RANK"', root],
                             capture_output=True, text=True).stdout.split()
    assert readers == [dist.__file__]


def test_launcher_local_rank_moves_to_the_env(monkeypatch):
    argv = ["train.py", "--local_rank=1", "method=lora", "--local-rank", "1", "seed=3"]
    assert dist.take_launcher_args(argv) == ["train.py", "method=lora", "seed=3"]
    assert os.environ["LOCAL_RANK"] == "1"


def test_ranks_share_one_run_folder(monkeypatch):
    argv = ["train.py", "method=lora"]
    assert dist.shared_run_dir(argv) == argv  # one process: Hydra's own ${now:...} folder
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert dist.shared_run_dir(argv) == [*argv, "hydra.run.dir=outputs/${now:%Y-%m-%d}/dist-job7"]
    assert dist.shared_run_dir([*argv, "hydra.run.dir=/x"]) == [*argv, "hydra.run.dir=/x"]


@pytest.mark.parametrize("env, on_loopback", [
    ({}, True),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}, True),  # one node
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, True),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}, False),  # two nodes
])
def test_collectives_stay_on_loopback_on_one_machine(monkeypatch, env, on_loopback):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dist.keep_collectives_on_loopback()
    assert (os.environ.get("GLOO_SOCKET_IFNAME") == "lo") is on_loopback
    assert (os.environ.get("NCCL_SOCKET_IFNAME") == "lo") is on_loopback


def test_one_process_group_is_made_on_an_in_memory_store():
    code = ("import os, torch.distributed as d; from glm_ft import dist; dist.setup_single_process_group(); "
            "print(d.is_initialized(), d.get_rank(), d.get_world_size(), os.environ['WORLD_SIZE'], "
            "dist.is_rank_zero());"
            "dist.destroy_process_group(); print(d.is_initialized())")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # DeepSpeed prints its accelerator line to stdout first
    assert [line.split() for line in out.stdout.splitlines()[-2:]] == [["True", "0", "1", "1", "True"], ["False"]]


def test_gpus_are_pinned_one_per_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(dist, "_pinned_gpu", None)
    code = ("import sys; from pathlib import Path; from glm_ft import dist; "
            "print(dist.pin_gpu_for_worker(Path(sys.argv[1]))); sys.stdout.flush(); sys.stdin.read()")
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        # the first worker holds its lock until it exits; a second worker in this process gets the other GPU
        assert first.stdout.readline().strip() == "0"
        assert dist.pin_gpu_for_worker(tmp_path) == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    finally:
        first.communicate("")


@pytest.mark.parametrize("signum, stop", [(signal.SIGTERM, "Terminated"), (signal.SIGINT, "KeyboardInterrupt")])
def test_a_collective_failed_after_the_launcher_was_stopped_is_that_stop(tmp_path, monkeypatch, signum, stop):
    """glm_ft.launch records the signal that stops it before it tells any rank: a collective that fails in a rank not
    told yet (its peer, told first, has ended) is that same stop; without the record it stays an error."""
    from glm_ft.launch import record_stops
    from glm_ft.tracking.signals import SIGTERM_GUARD, stop_behind
    from torch.distributed.elastic.multiprocessing import api

    monkeypatch.setattr(api, "_terminate_process_handler", api._terminate_process_handler)  # record_stops wraps it
    monkeypatch.setattr(SIGTERM_GUARD, "terminating", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(dist.LAUNCH_STOP, str(tmp_path / "stop"))
    failed = RuntimeError("Connection closed by peer [127.0.0.1]:29500")
    assert dist.launcher_stopped_by() is None and stop_behind(failed) is None
    record_stops(tmp_path / "stop")
    with pytest.raises(api.SignalException):  # then torchrun's own handler, which stops the ranks
        api._terminate_process_handler(signum, None)
    assert dist.launcher_stopped_by() == signal.Signals(signum).name
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert type(stop_behind(failed)).__name__ == stop
        # this rank's own signal, still on its way, is the same stop: it does not interrupt the rank's exit
        assert SIGTERM_GUARD.terminating
        assert signal.getsignal(signal.SIGINT) is (signal.SIG_IGN if signum == signal.SIGINT else previous)
    finally:
        signal.signal(signal.SIGINT, previous)
