"""Training under torch.distributed on the CPU: two gloo ranks train what one process trains.

- Exactness (`_ddp_worker.py`): on a zoo without batch norm and without augmentation, two ranks
  (each reading only its shard of every global batch from a `DatasetSplit`) end both
  pre-training stages with the weights one process gets, within float rounding (1e-6).
- The command: ``routerkit train --nproc 2`` on the tiny battery run completes, rank 0 alone
  writes (one log row per epoch), and its test table matches a one-process run at the same
  global batch sizes within 0.05 mean IoU. The tolerance covers what two ranks do differently
  by design: batch norm normalises over each rank's shard, and per-sample draws (dropout,
  exploration) come from per-rank generators.
- A two-process run killed in the policy stage resumes (``--resume --nproc 2``) to the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny import tiny_battery

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_ddp_worker.py")


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _env(tmp: Path) -> dict[str, str]:
    """One thread per rank; temporary files (torchrun's, the loaders') under the test's own folder."""
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), "TMPDIR": str(tmp / "tmp")}


def test_two_ranks_end_pretraining_with_the_weights_of_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(WORKER), str(one), "eager"], check=True, env=_env(tmp_path), timeout=300)
    subprocess.run(_torchrun(2, str(WORKER), str(two), "lazy"), check=True, env=_env(tmp_path), timeout=300, capture_output=True)
    a, b = torch.load(one), torch.load(two)
    for key in a["zoo"]:
        assert torch.allclose(a["zoo"][key], b["zoo"][key], atol=1e-6, rtol=0), key
    for la, lb in zip(a["logs"], b["logs"], strict=True):
        assert la.keys() == lb.keys() and all(la[k] == pytest.approx(lb[k], abs=1e-5) for k in la)
    assert torch.allclose(a["grad"], b["grad"]) and a["grad"].abs().sum() > 0  # uneven counts, one rank with none
    # One epoch of both models: 11 samples in global batches of 4, 4, 3 -> shares 2+2+2 and 2+2+1 per model
    # (+1: a DatasetSplit reads its first sample for the shapes). One process reads everything.
    assert a["read"] == [0] and b["read"] == [2 * 6 + 1, 2 * 5 + 1]


def _train(args: list[str], nproc: int, tmp_path: Path, name: str, timeout: float = 600) -> Path:
    run = tmp_path / name
    cmd = [sys.executable, "-m", "routerkit", "train", *args, "--run-dir", str(run)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    out = subprocess.run(cmd, env=_env(tmp_path), timeout=timeout, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run


def _overrides(*extra: str) -> list[str]:
    items = [*tiny_battery(), "evaluation.compare=false", "data.params.num_train=24", "data.params.num_test=8", *extra]
    return [str(ROOT / "examples" / "battery.yaml"), *[a for item in items for a in ("-s", item)]]


def _table(run: Path) -> dict[str, float]:
    rows = json.loads((run / "metrics" / "test.json").read_text())
    return {r["name"]: r["mean_iou"] for r in rows["results"]}


def test_two_process_run_matches_one_process_and_rank_0_alone_writes(tmp_path: Path) -> None:
    one = _train(_overrides(), 1, tmp_path, "one")
    two = _train(_overrides(), 2, tmp_path, "two")
    a, b = _table(one), _table(two)
    assert a.keys() == b.keys()
    for strategy, miou in a.items():
        assert b[strategy] == pytest.approx(miou, abs=0.05), strategy
    log = [json.loads(line) for line in (two / "metrics" / "train_log.jsonl").read_text().splitlines()]
    epochs = [(r["stage"], r["epoch"]) for r in log if "warning" not in r]
    assert len(epochs) == len(set(epochs)) == 4  # one row per epoch: rank 0 alone logs
    assert (two / "checkpoints" / "final.safetensors").exists()


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line names ``marker``, and wait until none is left."""
    deadline = time.monotonic() + 30
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if (
                    marker in (entry / "cmdline").read_bytes().decode(errors="replace")
                    and (entry / "stat").read_text().split()[2] != "Z"
                ):
                    alive.append(int(entry.name))
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes {alive} survived SIGKILL"
        time.sleep(0.05)


def test_a_killed_two_process_run_resumes_to_the_end(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    args = _overrides("training.policy.epochs=400")  # a long stage to be killed in
    cmd = [sys.executable, "-m", "routerkit", "train", *args, "--run-dir", str(run), "--nproc", "2"]
    proc = subprocess.Popen(
        cmd, env=_env(tmp_path), cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    try:
        while not (run / "checkpoints" / "2-policy-e0004.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no policy checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        _kill_all(str(run))  # the launcher, torchrun and every rank (torchrun starts them in sessions of their own)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before it was killed"
    assert not (run / "metrics" / "test.json").exists()
    out = subprocess.run(
        [sys.executable, "-m", "routerkit", "train", "--resume", str(run), "--nproc", "2"],
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Resuming from checkpoint" in out.stdout
    assert (run / "metrics" / "test.json").exists()
    log = [json.loads(line) for line in (run / "metrics" / "train_log.jsonl").read_text().splitlines()]
    epochs = [(r["stage"], r["epoch"]) for r in log if "warning" not in r]
    assert len(epochs) == len(set(epochs)) == 1 + 1 + 400 + 1  # every epoch once, none lost, none twice


@pytest.mark.slow  # .ci/run runs it
def test_the_optimal_stopping_cascade_fits_and_trains_jointly_in_two_processes(tmp_path: Path) -> None:
    joint = [
        "router.name=optimal_stopping",
        "router.params={}",
        "training.cascade.policy_epochs=2",
        "training.cascade.joint=true",
        "training.cascade.joint_epochs=2",
        "training.cascade.joint_lr=0.01",
        "evaluation.baselines=[]",
    ]
    run = _train(_overrides(*joint), 2, tmp_path, "joint")
    log = [json.loads(line) for line in (run / "metrics" / "train_log.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in log if "warning" not in r]
    assert stages.count("fit_cascade") == 1 and stages.count("fit_cascade_joint") == 2
    table = _table(run)
    assert table and all(0.0 <= v <= 1.0 for v in table.values())
