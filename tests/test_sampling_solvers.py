"""The flow solvers: upstream Wan2.2 TI2V UniPC parity (shared fixture) and properties that hold
for any step count, shift and shape."""
import json

import pytest
import torch
from safetensors.torch import load_file
from safetensors import safe_open

from conftest import fixture_path
from vidartrain.sampling import FlowEulerSolver, denoise, flow_schedule, make_solver


def fixture_velocity(latent: torch.Tensor, t: torch.Tensor, guide: float) -> torch.Tensor:
    """The fixture's closed-form stand-in for the guided DiT (its README, "Sampler fixture")."""
    frames = latent.shape[1]
    tf = torch.full((1, frames, 1, 1), float(t))
    tf[:, 0] = 0.0  # frame-0 tokens get timestep 0
    cond = 0.6 * latent * torch.cos(tf / 1000) + 0.1 * torch.sin(2 * latent + tf / 300)
    uncond = 0.5 * latent + 0.05 * torch.cos(latent) * (tf / 1000)
    return uncond + guide * (cond - uncond)


def test_unipc_matches_upstream_ti2v_loop_at_every_step():
    path = fixture_path("wan_reference", "sampler_unipc.safetensors")
    ref = load_file(path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["fixture"])
    solver = make_solver("unipc", meta["steps"], meta["shift"])
    assert torch.equal(solver.timesteps.float(), ref["timesteps"])
    torch.testing.assert_close(solver.sigmas, ref["sigmas"], atol=0, rtol=0)

    keep = torch.ones_like(ref["noise"])
    keep[:, 0] = 0.0
    condition = (1 - keep) * ref["z"]
    latent = condition + keep * ref["noise"]
    torch.testing.assert_close(latent, ref["latent.init"], atol=0, rtol=0)
    errors = []

    def check(i, velocity, latent):
        errors.append(max((velocity - ref[f"pred.{i}"]).abs().max().item(),
                          (latent - ref[f"latent.{i}"]).abs().max().item()))

    final = denoise(lambda x, t: fixture_velocity(x, t, meta["guide"]), latent, solver,
                    after_step=lambda x: condition + keep * x, on_step=check)
    assert len(errors) == meta["steps"]
    assert max(errors) < 1e-5, errors
    assert (final - ref["latent.final"]).abs().max().item() < 1e-5


def test_schedule_shape_and_shift():
    timesteps, sigmas = flow_schedule(50, 5.0)
    assert timesteps.dtype == torch.int64 and timesteps.shape == (50,) and sigmas.shape == (51,)
    assert sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert timesteps[0] == 999  # 5 * 0.999 / (1 + 4 * 0.999) * 1000 = 999.8
    unshifted_t, unshifted = flow_schedule(4, 1.0)
    torch.testing.assert_close(unshifted[:-1].double(), torch.linspace(0.999, 0.0, 5, dtype=torch.float64)[:-1],
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least one step"):
        flow_schedule(0, 5.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow_schedule(10, 0.0)
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("ddim", 10, 5.0)


def gaussian_problem(shape, seed=0):
    """Data N(m, c^2) per element: the exact velocity field and the exact ODE end point of a start
    x at noise level s (the flow keeps z = (x - (1-s) m) / sqrt((1-s)^2 c^2 + s^2) fixed)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    c = torch.rand(shape, generator=g, dtype=torch.float64) + 0.3

    def velocity(x, s):
        s = float(s)
        posterior_mean = m + (1 - s) * c ** 2 / ((1 - s) ** 2 * c ** 2 + s ** 2) * (x - (1 - s) * m)
        return (x - posterior_mean) / s

    def end_point(x, s):
        return m + c * (x - (1 - s) * m) / torch.sqrt((1 - s) ** 2 * c ** 2 + s ** 2)

    return velocity, end_point, torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("steps,shift,shape", [(6, 1.0, (2, 3)), (20, 3.0, (1, 48, 2, 4, 4)),
                                               (50, 5.0, (4, 7))])
def test_both_solvers_converge_to_the_exact_flow_end_point(steps, shift, shape):
    velocity, end_point, x0 = gaussian_problem(shape)
    results = {}
    for name in ("unipc", "euler"):
        solver = make_solver(name, steps, shift)
        solver.sigmas = solver.sigmas.double()  # float64 here: measure the method, not the rounding
        s_start = solver.sigmas[0].item()
        results[name] = (denoise(lambda x, t: velocity(x, solver.sigmas[solver.step_index]), x0, solver)
                         - end_point(x0, s_start)).abs().max().item()
    # UniPC (order 2 + corrector) is far more accurate than Euler at the same step count.
    assert results["unipc"] < 0.35 * results["euler"], results
    assert results["unipc"] < 0.15, results


def test_unipc_error_falls_faster_than_euler():
    velocity, end_point, x0 = gaussian_problem((3, 5), seed=1)

    def error(name, steps):
        solver = make_solver(name, steps, 1.0)
        solver.sigmas = solver.sigmas.double()
        out = denoise(lambda x, t: velocity(x, solver.sigmas[solver.step_index]), x0, solver)
        return (out - end_point(x0, solver.sigmas[0].item())).abs().max().item()

    euler_ratio = error("euler", 10) / error("euler", 40)
    unipc_ratio = error("unipc", 10) / error("unipc", 40)
    assert 2.5 < euler_ratio < 6  # first order: ~4x for 4x the steps
    assert unipc_ratio > 2 * euler_ratio  # higher order


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_exact_velocity_of_a_straight_flow_recovers_the_data(name):
    g = torch.Generator().manual_seed(3)
    x1, x0 = torch.randn(2, 48, 3, 4, 4, generator=g), torch.randn(2, 48, 3, 4, 4, generator=g)
    solver = make_solver(name, 7, 5.0)
    out = denoise(lambda x, t: (x - x1) / solver.sigmas[solver.step_index], x0, solver)
    assert (out - x1).abs().max().item() < 1e-4


def test_euler_equals_a_hand_rolled_loop():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 48, 2, 4, 4, generator=g)
    model = lambda x, t: torch.sin(x) * (t.float() / 1000)  # noqa: E731
    solver = make_solver("euler", 9, 3.0)
    assert isinstance(solver, FlowEulerSolver)
    out = denoise(model, x, solver)
    timesteps, sigmas = flow_schedule(9, 3.0)
    expected = x
    for i in range(9):
        expected = expected + (sigmas[i + 1] - sigmas[i]) * model(expected, timesteps[i])
    assert torch.equal(out, expected)
