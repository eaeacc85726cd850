"""Progress bars for long work inside Ray workers: DP-SGD steps and the TRL trainers.

Why Ray's own ``tqdm_ray`` and not a plain tqdm: a tqdm in a Ray Train worker writes
carriage-return refreshes into the worker's stdout, which Ray forwards to the driver as one log
line per refresh.  ``ray.experimental.tqdm_ray`` sends the bar's state instead, and the driver
draws it where Ray Data draws its bars.  Whether bars are drawn at all is the driver's decision
(:func:`dpray.runtime.progress_enabled`: on a terminal by default), handed to workers in their
plan, so CI logs and ``ray job submit`` output stay free of them.

What a bar may show: step counts and ε (both public).  Never a record, and never a per-step time
of DP-SGD, whose Poisson batch size is private: :class:`StepBar` advances only in chunks of
``every`` steps, the same points the stage logs at.
"""

from __future__ import annotations

from typing import Any


class StepBar:
    """A step counter drawn on the driver, or nothing when ``enabled`` is false.

    ``every``: the bar moves only when a multiple of ``every`` steps (or the last step) is done,
    so its rate is an average over many steps.
    """

    def __init__(self, desc: str, total: int, *, enabled: bool, start: int = 0, every: int = 1):
        self.desc = desc
        self.total = total
        self.every = max(1, every)
        self.shown = start
        self._bar = None
        if enabled and total:
            from ray.experimental.tqdm_ray import tqdm

            self._bar = tqdm(desc=desc, total=total, unit="step", flush_interval_s=0.0)
            if start:
                self._bar.update(start)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def advance_to(self, done: int, note: str | None = None) -> None:
        """``done`` steps are finished; show them if a chunk boundary (or the end) is reached."""
        if self._bar is None or done <= self.shown:
            return
        if done % self.every and done < self.total:
            return
        if note:
            self._bar.set_description(f"{self.desc} {note}")
        self._bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def trainer_progress_callback(stage: str, enabled: bool) -> list[Any]:
    """A TRL/transformers callback list drawing ``stage``'s optimiser steps (empty when off).

    Rank 0 draws the bar; TRL's own tqdm stays off (``disable_tqdm``) because in a Ray worker it
    would be forwarded line by line.
    """
    if not enabled:
        return []
    from transformers import TrainerCallback

    class RayStepProgress(TrainerCallback):
        bar: StepBar | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = StepBar(stage, int(state.max_steps or 0), enabled=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.advance_to(int(state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return [RayStepProgress()]
