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
