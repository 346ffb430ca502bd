"""launch/torchrun_node.sh refuses what would leave every node waiting for a rendezvous that never comes,
before torchrun starts; launch/multi_node.sh lets the ranks meet where rank 0 runs; launch/slurm_multi_node.sbatch
requeues a job stopped at its time limit, and only that."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.trainer_launch import REPO_ROOT


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("NNODES", "MASTER_ADDR", "NODE_RANK")}
    # VIDARTRAIN_VENV points nowhere: a script that gets past its checks fails at exec (exit 127)
    return subprocess.run(["bash", "launch/torchrun_node.sh", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env={**environment, "VIDARTRAIN_VENV": "/nonexistent", **env})


def test_several_nodes_without_master_addr_are_refused_before_torchrun_starts():
    done = run_script("8", "--config", "configs/vidarc_causal.yaml", NNODES="2", NODE_RANK="1")
    assert done.returncode == 2
    assert "NNODES=2 needs MASTER_ADDR, the host name of the node every node meets at" in done.stderr


def test_the_process_count_is_required():
    done = run_script()
    assert done.returncode == 2 and "usage: launch/torchrun_node.sh PROCESSES_PER_NODE" in done.stderr


def test_one_node_needs_no_master_addr():
    done = run_script("2", NNODES="1")  # past the checks: the (absent) torchrun is what fails
    assert done.returncode == 127 and "/nonexistent/bin/torchrun" in done.stderr


def test_multi_node_leaves_the_meeting_address_to_deepspeed_unless_master_addr_is_set(tmp_path):
    # DeepSpeed's runner takes the hostfile's first host, where rank 0 runs; the script passed the address
    # of the host it ran on, so from a login node every rank waited for a rank 0 that is not there
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')
    (tmp_path / "bin" / "deepspeed").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path / "args"}\n')
    for name in ("python", "deepspeed"):
        (tmp_path / "bin" / name).chmod(0o755)

    def launched(**env: str) -> str:
        environment = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        done = subprocess.run(["bash", "launch/multi_node.sh", "launch/hostfile.example", "--config", "c.yaml"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                              env={**environment, "VIDARTRAIN_VENV": str(tmp_path), **env})
        assert done.returncode == 0, done.stderr
        return (tmp_path / "args").read_text().strip()

    assert launched() == "--hostfile launch/hostfile.example --master_port 29500 launch/train.py --config c.yaml"
    assert launched(MASTER_ADDR="node-01").startswith("--hostfile launch/hostfile.example --master_addr node-01 ")


FAKE_SRUN = """#!/usr/bin/env bash
# the step: records its arguments, runs until it ends by itself or a SIGTERM stops it
trap 'echo TERM >> "$FAKE_LOG/events"; exit 0' TERM
echo "$@" > "$FAKE_LOG/srun_args"
for _ in $(seq 600); do
    [ -f "$FAKE_LOG/finish" ] && exit "$(cat "$FAKE_LOG/finish")"
    sleep 0.05
done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
    show) echo node-01; echo node-02 ;;
    requeue) echo "requeue $2" >> "$FAKE_LOG/events" ;;
esac
"""


def start_slurm_script(tmp_path):
    """launch/slurm_multi_node.sbatch under a fake SLURM (srun, scontrol) once its step has started."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    inherited = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "VIDARTRAIN_VENV")}
    env = {**inherited, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
           "SLURM_SUBMIT_DIR": str(REPO_ROOT), "SLURM_JOB_NODELIST": "node-[01-02]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242"}
    script = subprocess.Popen(["bash", "launch/slurm_multi_node.sbatch"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun_args").exists():
        assert script.poll() is None and time.monotonic() < deadline, script.communicate()
        time.sleep(0.05)
    return script


def events(tmp_path) -> list[str]:
    log = tmp_path / "events"
    return log.read_text().split("\n")[:-1] if log.exists() else []


def test_slurm_job_near_its_time_limit_stops_the_ranks_then_requeues_itself(tmp_path):
    script = start_slurm_script(tmp_path)
    # the job's own port (29500 + job id mod 1000), and the venv the setup script made
    assert "--rdzv_endpoint node-01:29742" in (tmp_path / "srun_args").read_text()
    assert (tmp_path / "srun_args").read_text().startswith(f"--kill-on-bad-exit=1 {REPO_ROOT / '.venv'}/bin/torchrun")
    assert "--resume auto" in (tmp_path / "srun_args").read_text()
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends
    _, stderr = script.communicate(timeout=30)
    assert script.returncode == 0, stderr
    assert events(tmp_path) == ["TERM", "requeue 4242"]  # the checkpoint is saved before the requeue


@pytest.mark.parametrize("exit_status", [0, 1])
def test_slurm_job_that_ends_by_itself_or_fails_is_not_requeued(tmp_path, exit_status):
    script = start_slurm_script(tmp_path)
    (tmp_path / "finish").write_text(str(exit_status))
    _, stderr = script.communicate(timeout=30)
    assert script.returncode == exit_status, stderr
    assert events(tmp_path) == []
