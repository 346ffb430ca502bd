"""launch/torchrun_node.sh refuses what would leave every node waiting for a rendezvous that never comes,
before torchrun starts."""
import os
import subprocess

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
