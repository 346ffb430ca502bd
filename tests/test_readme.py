"""The README runs as written: every command of its ```bash blocks that needs neither a GPU nor the
network is run, in order, in a fresh directory that sees the repository's configs, profiles and
launch scripts, and then every ```python block (they read what the commands wrote). A command is
left out only by a rule below that says why."""
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers.trainer_launch import REPO_ROOT

# (pattern in the command, why it is not run here)
NOT_RUN = [
    (r"^bash launch/demo\.sh", "the whole demo takes minutes; run by hand and measured (README)"),
    (r"^bash launch/run_tests\.sh", "is this test suite"),
    (r"^python -m venv|^pip install", "installs from the network"),
    (r"download_checkpoints", "downloads the published checkpoints"),
    (r"--device cuda", "needs a GPU (and the downloaded checkpoints)"),
    (r"^deepspeed --num_gpus [1-9]", "trains on GPUs"),
    (r"^pytest -m gpu|^python -m benchmarks\.gpu", "the GPU lane"),
    (r"^vidar-import", "reads a public dataset that must be downloaded first"),
    (r"^vidar-sample .*checkpoints/Wan2\.2-TI2V-5B", "samples the downloaded 5B model"),
    (r"demo_run/", "reads what bash launch/demo.sh wrote"),
]


def readme_commands() -> list[str]:
    """Commands of the README's bash blocks: continuation lines joined, comments dropped."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            command = re.sub(r"(^|\s)#.*$", "", line).strip()
            if command:
                commands.append(command)
    return commands


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), flags=re.DOTALL)


def reason_not_run(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


def test_every_readme_command_without_gpu_or_network_runs(tmp_path):
    commands = readme_commands()
    runnable = [c for c in commands if reason_not_run(c) is None]
    assert any(c.startswith("vidar-shard") for c in runnable) and any(c.startswith("vidar-plan") for c in runnable)
    for name in ("configs", "ds_configs", "launch"):
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    for command in runnable:
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"README command failed: {command}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    blocks = readme_python_blocks()
    assert blocks, "the README's Python loader example is gone: update this test"
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"README Python block failed:\n{block}\n{result.stderr[-3000:]}"


def test_only_the_listed_kinds_of_commands_are_left_out():
    left_out = {c: reason_not_run(c) for c in readme_commands() if reason_not_run(c)}
    # each rule still matches something (a stale rule would hide nothing but mislead)
    for pattern, why in NOT_RUN:
        assert any(re.search(pattern, c) for c in left_out), f"no README command matches {pattern!r} ({why})"
