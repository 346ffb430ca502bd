"""benchmarks/optimizer_step.py: both AdamW implementations it times update the same values (so the ratio
compares like with like), and its table names what it measured."""
from benchmarks import optimizer_step


def test_the_fused_and_default_adamw_steps_agree_and_are_both_timed():
    result = optimizer_step.run(millions=0.01, steps=2)
    assert result["parameters"] == 10_000 and result["max_abs_difference"] < 1e-6
    assert all(seconds > 0 for seconds in result["seconds_per_step"].values())
    table = optimizer_step.markdown(result)
    assert "| `fused=True` (`build_optimizer`) |" in table and "mean of 2 steps" in table
