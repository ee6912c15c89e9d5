"""Progress of long loops: plain log lines by default, live bars only on a terminal; on a terminal
of any width nothing is cut, the time left counts down steadily, and the work beside the count
(validating, saving, the critic's warm-up) is named."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from rft.progress import LiveDisplay, Task, live_progress, wants_bars
from rft_core import progress as progress_module
from rft_core.progress import LogReporter, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_by_default_about_ten_per_task_with_rate_and_latest_figures(caplog):
    caplog.set_level(logging.INFO, logger="rft.progress")
    with progress("sft", 40, "steps") as bar:
        for step in range(1, 41):
            bar.update(step, loss=1.0 / step)
    lines = [r.getMessage() for r in caplog.records if r.name == "rft.progress"]
    assert 9 <= len(lines) <= 11
    assert lines[-1].startswith("sft 40/40 steps (")
    assert "/s, 0s left)" in lines[-1] and lines[-1].endswith("loss 0.025")


def test_a_resumed_loop_reports_from_where_it_starts(caplog):
    caplog.set_level(logging.INFO, logger="rft.progress")
    with progress("rl", 10, "iterations", start=6) as bar:
        for done in range(7, 11):
            bar.update(done, reward_mean=0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "rft.progress"]
    assert lines[0].startswith("rl 7/10 iterations") and lines[-1].startswith("rl 10/10 iterations")


def test_bars_only_on_a_terminal():
    assert not wants_bars(io.StringIO())
    assert wants_bars(Terminal())


def test_live_progress_installs_bars_for_the_block_and_restores_plain_lines():
    assert isinstance(progress_module._reporter, LogReporter)
    with live_progress(enabled=False):
        assert isinstance(progress_module._reporter, LogReporter)
    with live_progress(enabled=True):
        assert isinstance(progress_module._reporter, LiveDisplay)
    assert isinstance(progress_module._reporter, LogReporter)


def test_rich_bars_show_done_total_and_latest_figures():
    out = Terminal()
    reporter = LiveDisplay(Console(file=out, force_terminal=True, width=200))
    previous = progress_module.set_reporter(reporter)
    try:
        with reporter.live, progress("rl", 5, "iterations") as bar:
            for done in range(1, 6):
                bar.update(done, reward_mean=0.25, val_accuracy=0.5)
    finally:
        progress_module.set_reporter(previous)
    shown = out.getvalue()
    assert "5/5" in shown and "reward_mean 0.250 val_accuracy 0.500" in shown


# --------------------------------------------------------------------------- the terminal display


DEMO_ROWS = [  # what `rft run` shows once evaluation starts, with the figures each loop reports
    ("pretrain tiny model", 200, "steps", 200, {"loss": 1.234}, None),
    ("sft", 250, "steps", 249, {"loss": 0.531, "val_accuracy": 0.417, "val_sampled_reward": 0.382}, "validating"),
    ("rl", 300, "iterations", 3, {"reward_mean": 0.162, "kl": 0.0, "val_accuracy": 0.417,
                                  "val_sampled_reward": 0.382},
     "critic warm-up 3/10: value head only, the policy does not move"),
    ("evaluate sft", 600, "prompts", 600, {}, None),
    ("evaluate rl", 600, "prompts", 64, {}, None),
]


def draw(width: int) -> str:
    out = Terminal()
    console = Console(file=out, force_terminal=True, width=width, color_system=None)
    display = LiveDisplay(console)
    for name, total, unit, done, latest, note in DEMO_ROWS:
        task = display.start(name, total, unit)
        display.update(task, 0, {})
        task.first = (0, task.first[1] - 30.0)  # 30 s of work behind it: a rate and a time left
        display.update(task, done, latest)
        display.note(task, note)
        if done == total:
            display.finish(task)
    console.print(display)
    return out.getvalue()


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120, 160])
def test_no_line_is_cut_or_wider_than_the_terminal(width: int) -> None:
    shown = draw(width)
    assert all(len(line) <= width for line in shown.splitlines()), shown
    assert "…" not in shown
    words = shown.split()
    for name, total, _unit, done, latest, note in DEMO_ROWS:
        assert f"{done}/{total}" in words, (name, shown)
        expected = (format_figures(latest) + (f"; {note}" if note else "")).split()
        # Every figure and every word of the note, whole and in order (wrapping is between words).
        assert any(words[i:i + len(expected)] == expected for i in range(len(words))), (name, shown)
    assert ("left" in shown) and ("done in" in shown)


def format_figures(latest: dict) -> str:
    from rft_core.progress import format_latest

    return format_latest(latest)


def test_wide_terminals_get_a_bar_narrow_ones_keep_the_figures_instead() -> None:
    assert "━" in draw(120) and "━" not in draw(40)


def test_time_left_counts_down_between_updates_and_never_blanks() -> None:
    task = Task("rl", 100, "iterations", started=0.0)
    task.update(0, 0.0)
    assert task.timing(1.0) == "0:01 elapsed, starting"
    task.update(10, 20.0)  # 0.5 iterations per second: 90 left take 3:00
    lefts = [task.timing(now) for now in (20.0, 50.0, 80.0)]
    assert lefts == ["0:20 elapsed, 3:00 left (0.5/s)", "0:50 elapsed, 2:30 left (0.5/s)",
                     "1:20 elapsed, 2:00 left (0.5/s)"]
    task.update(11, 90.0)  # a slow iteration: the estimate moves, it does not blank out
    assert "left" in task.timing(90.0) and "-:--" not in task.timing(90.0)
    task.finished = 100.0
    assert task.timing(200.0).startswith("stopped after 1:40")  # ended at 11 of 100 (Ctrl-C)
    task.update(100, 100.0)
    assert task.timing(200.0).startswith("done in 1:40")


class Recorder:
    """A reporter that keeps what the loops said, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, task, total, unit):
        self.events.append(("start", task, total))
        return task

    def update(self, handle, done, latest):
        self.events.append(("update", handle, done))

    def note(self, handle, text):
        self.events.append(("note", handle, text))

    def finish(self, handle):
        self.events.append(("finish", handle))


def test_the_loops_name_their_work_beside_the_count(tmp_path) -> None:
    """Pretraining is labelled as the tiny model's; a validation or a checkpoint is named once the
    bar shows its step done (not a bar sitting at 5/6); the critic's warm-up iterations say so."""
    from training_fixtures import tiny_config, tiny_task

    from rft_core.rl.trainer import run_rl
    from rft_core.sft import run_sft

    cfg = tiny_config(tmp_path, "model.tiny.pretrain_steps=2", "sft.eval_interval=3", "rl.critic_warmup=1",
                      "rl.eval_interval=2", "eval.sampled_validation=false")
    recorder = Recorder()
    previous = progress_module.set_reporter(recorder)
    try:
        train, val, base = tiny_task(tmp_path, cfg)
        sft = run_sft(cfg, train, val, base, tmp_path / "sft")
        run_rl(cfg, train, val, sft.model_dir, tmp_path / "rl")
    finally:
        progress_module.set_reporter(previous)
    events = recorder.events
    assert ("start", "pretrain tiny model", 2) in events

    def done_when(task: str, text: str) -> list[int]:
        """The count the bar of `task` showed each time `text` was named."""
        shown, found = 0, []
        for event in events:
            if event[0] == "update" and event[1] == task:
                shown = event[2]
            elif event[0] == "note" and event[1] == task and event[2] and text in event[2]:
                found.append(shown)
        return found

    assert done_when("sft", "validating") == [0, 3, 6]  # the starting model, then every 3 steps
    assert done_when("sft", "validating the starting model") == [0]
    assert done_when("sft", "saving a checkpoint") == [2, 4, 6]
    assert done_when("rl", "validating") == [0, 2]
    notes = [event[2] for event in events if event[:2] == ("note", "rl") and event[2]]
    warmup = [note for note in notes if note.startswith("critic warm-up")]
    assert warmup and all(note.startswith("critic warm-up 1/1: value head only") for note in warmup)
    assert [event for event in events if event[:2] == ("note", "rl")][-1][2] is None  # iteration 2 trains the policy


def test_plain_lines_name_the_work_at_the_end_and_a_few_times_over_a_task(caplog):
    caplog.set_level(logging.INFO, logger="rft.progress")
    with progress("rl", 100, "iterations") as bar:
        for done in range(1, 101):
            bar.update(done, reward_mean=0.5)
            with bar.doing("saving a checkpoint"):
                pass
    notes = [r.getMessage() for r in caplog.records if r.getMessage().endswith(": saving a checkpoint")]
    assert 9 <= len(notes) <= 12 and notes[-1] == "rl 100/100 iterations: saving a checkpoint"


@pytest.mark.parametrize(
    ("phases", "expected"),
    [
        # A critic warm-up of 5 iterations in 20: its lines say so, the ones after do not.
        ({done: f"critic warm-up {done}/5" for done in range(1, 6)},
         {3: "critic warm-up 3/5", 5: "critic warm-up 5/5", 7: None, 20: None}),
        # A phase that lasts the whole task is on its every line.
        ({done: "one phase" for done in range(1, 21)}, {3: "one phase", 20: "one phase"}),
        # No phase: the lines end on the figures.
        ({}, {3: None, 20: None}),
    ],
    ids=["warm-up", "whole-task", "none"],
)
def test_plain_lines_name_the_phase_their_figures_come_from(caplog, phases, expected):
    caplog.set_level(logging.INFO, logger="rft.progress")
    with progress("rl", 20, "iterations") as bar:
        for done in range(1, 21):
            bar.note(phases.get(done))  # what the loop names before the iteration it counts
            bar.update(done, kl=0.0)
    lines = {int(m.split()[1].split("/")[0]): m for m in (r.getMessage() for r in caplog.records)
             if " iterations (" in m}
    for done, phase in expected.items():
        assert lines[done].endswith(f"kl 0.000; {phase}" if phase else "kl 0.000"), lines[done]
