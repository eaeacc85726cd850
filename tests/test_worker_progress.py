"""Progress bars drawn from Ray workers (dpray.worker_progress): chunked steps, public notes only."""

from __future__ import annotations

from types import SimpleNamespace

from dpray.worker_progress import StepBar, trainer_progress_callback


def shown_sequence(bar: StepBar, steps: range, note=None) -> list[int]:
    seen = []
    for done in steps:
        bar.advance_to(done, note)
        if not seen or seen[-1] != bar.shown:
            seen.append(bar.shown)
    return seen


def test_dp_sgd_bar_moves_only_in_chunks(capsys):
    bar = StepBar("train-generator (DP-SGD)", 12, enabled=True, every=5)
    # one step's time would track the private Poisson batch size: never shown alone
    assert shown_sequence(bar, range(1, 13), note="epsilon<=0.50") == [0, 5, 10, 12]
    bar.close()
    drawn = capsys.readouterr().err
    assert (
        "train-generator (DP-SGD) epsilon<=0.50" in drawn and "12.0/12.0" in drawn
    )  # tqdm_ray draws with unit_scale


def test_a_resumed_run_starts_where_it_was():
    bar = StepBar("train-generator (DP-SGD)", 10, enabled=True, start=4, every=2)
    assert bar.shown == 4
    bar.advance_to(5)
    assert bar.shown == 4
    bar.advance_to(6)
    assert bar.shown == 6
    bar.close()


def test_off_draws_nothing(capsys):
    bar = StepBar("train-generator (DP-SGD)", 10, enabled=False)
    bar.advance_to(10)
    bar.close()
    assert not bar.active and capsys.readouterr().err == ""
    assert trainer_progress_callback("sft", enabled=False) == []


def test_trainer_callback_draws_rank_zeros_steps(capsys):
    (callback,) = trainer_progress_callback("sft", enabled=True)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    assert "sft" in capsys.readouterr().err
    other = SimpleNamespace(is_world_process_zero=False, max_steps=3, global_step=0)
    (callback,) = trainer_progress_callback("sft", enabled=True)
    callback.on_train_begin(None, other, None)
    assert callback.bar is None
