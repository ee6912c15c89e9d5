"""What SFT and RL share (`rft_core.training`), and the layout that keeps them siblings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from rft_core.training import Processes, selection_key, step_positions

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_sft_and_rl_import_neither_each_other_nor_evaluations_helpers():
    sft = imported_modules(ROOT / "rft_core" / "sft.py")
    rl = imported_modules(ROOT / "rft_core" / "rl" / "trainer.py")
    assert not any(m.startswith("rft_core.rl") for m in sft)
    assert not any(m.startswith("rft_core.sft") for m in rl)
    # From evaluation, training takes the validation metrics only.
    for modules in (sft, rl):
        assert {m for m in modules if m.startswith("rft_core.evaluate.")} == {"rft_core.evaluate.validation_metrics"}


def test_step_positions_are_a_fresh_permutation_every_epoch_and_a_function_of_the_step():
    n, batch = 5, 3
    first_two_epochs = [i for step in range(4) for i in step_positions(step, batch, n, seed=7)][: 2 * n]
    assert sorted(first_two_epochs[:n]) == list(range(n)) and sorted(first_two_epochs[n:]) == list(range(n))
    assert step_positions(2, batch, n, seed=7) == step_positions(2, batch, n, seed=7)
    assert step_positions(2, batch, n, seed=8) != step_positions(2, batch, n, seed=7)


def test_one_process_sums_are_the_identity_and_every_micro_batch_is_visited():
    processes = Processes(Accelerator(cpu=True))
    assert processes.world == 1 and processes.rank == 0
    t = torch.tensor([1.5, 2.0])
    assert processes.sum(t) is t
    assert processes.total(torch.tensor(0.1, dtype=torch.float32)) == float(torch.tensor(0.1, dtype=torch.float32))
    assert processes.total(0.1) == 0.1  # a Python float keeps its double precision
    assert processes.mean({"zero_std_groups": 0.25}) == {"zero_std_groups": 0.25}
    model = torch.nn.Linear(2, 1)
    assert list(processes.accumulate(model, [[0], [1, 2], [3]])) == [[0], [1, 2], [3]]
    w = torch.tensor(3.0, requires_grad=True)
    processes.backward(2 * w)
    assert w.grad.item() == 2.0


def test_checkpoints_rank_by_accuracy_then_reward_then_lower_loss():
    a = {"val_accuracy": 0.5, "val_reward_mean": 0.1, "val_loss": 2.0}
    b = {"val_accuracy": 0.5, "val_reward_mean": 0.1, "val_loss": 1.0}
    c = {"val_accuracy": 0.4, "val_reward_mean": 0.9, "val_loss": 0.1}
    assert selection_key(b) > selection_key(a) > selection_key(c)


def test_fsdp_is_refused_on_transformers_releases_older_than_the_tested_one(monkeypatch):
    import transformers

    from rft_core import training

    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    with pytest.raises(RuntimeError, match=r"FSDP is tested with transformers >= 5.24 only \(this is 5.0.0"):
        training.shard(torch.nn.Linear(2, 2), plugin=None)
