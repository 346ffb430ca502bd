"""`python -m benchmarks --render`: the README's performance section and results.md rebuilt from the
committed results without measuring anything (how GPU results measured elsewhere reach the README)."""
import json

import pytest

import benchmarks.__main__ as bench


def test_render_rewrites_the_readme_section_from_the_committed_results(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"# head\n{bench.README_BEGIN}\nstale\n{bench.README_END}\ntail\n")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    monkeypatch.setattr(bench, "measure", lambda names: pytest.fail("--render measured something"))
    assert bench.main(["--render"]) == 0
    text = readme.read_text()
    assert text.startswith(f"# head\n{bench.README_BEGIN}\nMeasured on ") and text.endswith(f"{bench.README_END}\ntail\n")
    assert "stale" not in text
    committed = json.loads(bench.CPU_RESULTS.read_text())
    assert f"commit {committed['machine']['commit']}" in text
    assert "### GPU: real TI2V-5B sizes" in text  # from the committed results_gpu.json
    assert (tmp_path / "benchmarks" / "results.md").read_text() == "# Benchmark results\n\n" + text.split(
        f"{bench.README_BEGIN}\n")[1].split(bench.README_END)[0]


def test_only_replaces_its_benchmarks_keeps_the_others_and_says_when_it_measured(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "README.md").write_text(f"{bench.README_BEGIN}\n{bench.README_END}\n")
    committed = json.loads(bench.CPU_RESULTS.read_text())
    monkeypatch.setattr(bench, "REPO", tmp_path)
    monkeypatch.setattr(bench, "CPU_RESULTS", tmp_path / "benchmarks" / "results.json")
    bench.CPU_RESULTS.write_text(json.dumps(committed))
    later = dict(committed["machine"], commit="later1", date="2030-01-01 00:00 UTC")
    fresh = {"parameters": 10, "steps": 1, "threads": 1, "seconds_per_step": {"default": 2.0, "fused": 1.0},
             "fused_speedup": 2.0, "max_abs_difference": 0.0}
    monkeypatch.setattr(bench, "measure", lambda names: {"machine": later, "benchmarks": {"optimizer_step": fresh},
                                                         "planner": committed["planner"]})
    assert bench.main(["--only", "optimizer_step"]) == 0
    written = json.loads(bench.CPU_RESULTS.read_text())
    assert written["machine"] == committed["machine"]
    assert written["benchmarks"] == dict(committed["benchmarks"], optimizer_step=fresh)
    assert written["measured_separately"]["optimizer_step"]["commit"] == "later1"
    text = (tmp_path / "README.md").read_text()
    assert f"commit {committed['machine']['commit']}" in text
    assert "Measured separately on" in text and "commit later1, 2030-01-01 00:00 UTC." in text
