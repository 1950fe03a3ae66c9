"""A step function that runs out of memory leaves nothing behind, and its answer does not depend on the start."""

import pytest
import torch
from oom_texts import RUNTIME_OOM_TEXTS
from torch import nn

from mps_autobatch import find_safe_batch_size
from mps_autobatch.simulate import simulated_backend
from mps_autobatch.workload import CallableWorkload


def _mlp_and_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    optimizer = torch.optim.AdamW(model.parameters())

    def step(batch_size):
        x, y = torch.randn(batch_size, 256), torch.randint(10, (batch_size,))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def _probe(step, requested, **kwargs):
    backend = simulated_backend("mps:16GiB")
    result = find_safe_batch_size(step, device=backend, memory_limit="256MiB", requested=requested, **kwargs)
    return result, backend


@pytest.mark.parametrize("requested", [8192, 16384])
def test_after_out_of_memory_trials_the_search_goes_on_and_leaves_no_gradient(requested):
    model, optimizer, step = _mlp_and_step()
    result, backend = _probe(step, requested)
    outcomes = [t.outcome for t in result.trials]
    assert outcomes[0] == "oom" and outcomes[-1] == "ok"  # before: every later trial failed, batch size 1 too
    assert all(p.grad is None for p in model.parameters())
    assert len(optimizer.state) == 6  # the warm-up's AdamW state for 6 tensors, nothing the failed steps made
    # The trials after the failures read what a fresh search reads at those sizes: nothing was left allocated.
    fresh_model, fresh_optimizer, fresh_step = _mlp_and_step()  # kept alive: their tensors are what is left
    fresh, fresh_backend = _probe(fresh_step, 4096)
    assert {t.outcome for t in fresh.trials} == {"ok"}
    assert abs(result.batch_size - fresh.batch_size) <= 0.05 * fresh.batch_size
    # Left alive on the device: the weights and AdamW's moments (54 MiB), exactly as after a probe with no failure.
    left = backend.sim.current_allocated_memory()
    assert left == fresh_backend.sim.current_allocated_memory()
    assert round(left / 2**20) == 54


def test_the_answer_is_the_same_from_any_start_on_a_rising_stretch():
    # Below ~1700 samples the simulated peak rises with the batch: starting at 80 % of 1400 or from 2 lands
    # within 5 %. (Above it the allocator's reuse makes the curve fall again, so a start at 4096 finds the
    # larger sizes under the budget: see the search issue.)
    from_two, from_1120 = (_probe(_mlp_and_step()[2], requested)[0].batch_size for requested in (None, 1400))
    assert from_two == 1024  # 1007 before the policy module
    assert abs(from_1120 - from_two) <= 0.05 * from_two


class _FailingAdamW(torch.optim.AdamW):
    """Creates its state, then runs out of memory, as AdamW does when its moments do not fit."""

    fail = False

    def step(self, closure=None):
        if not self.fail:
            return super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["exp_avg"] = torch.zeros_like(param)
        raise RuntimeError(RUNTIME_OOM_TEXTS[0])


def test_recover_drops_the_gradients_and_the_optimizer_state_a_failed_step_created():
    model = nn.Linear(4, 2)
    optimizer = _FailingAdamW(model.parameters())
    optimizer.fail = True

    def step(batch_size):
        model(torch.randn(batch_size, 4)).sum().backward()
        optimizer.step()

    workload = CallableWorkload(step)
    with pytest.raises(RuntimeError, match="MPS backend out of memory"):
        workload.step(8)
    assert model.weight.grad is not None and len(optimizer.state) == 2
    workload.recover()
    assert model.weight.grad is None and model.bias.grad is None
    assert len(optimizer.state) == 0


def test_model_and_optimizer_are_restored_bit_for_bit_when_given():
    model, optimizer, step = _mlp_and_step()
    step(4)  # the optimizer has state before the probe
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    _probe(step, 8192, model=model, optimizer=optimizer)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(optimizer.state.values(), moments))
    # Without them, the probe trains the model on its synthetic batches (as the docstring says).
    _probe(step, 8192)
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_model_and_optimizer_must_be_the_objects_to_restore():
    with pytest.raises(TypeError, match="optimizer must be the step's torch.optim.Optimizer to save and restore"):
        find_safe_batch_size(lambda b: None, device="cpu", optimizer="adamw")
