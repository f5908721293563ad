"""The two Trainer callbacks ``drhouse train`` adds to TRL's SFTTrainer (not speed-ups: when to
evaluate and when to stop)."""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class EvaluateLastStep(TrainerCallback):
    """Evaluates the last step too, when it is not a multiple of eval_steps (the Trainer
    checkpoints it anyway): otherwise the best-checkpoint choice at the end never sees the end
    of the epoch (a full epoch of 575 steps evaluated every 100 kept step 500's weights)."""

    def on_step_end(self, _args: Any, state: Any, control: Any, **__: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_evaluate = True


class TimeBudget(TrainerCallback):
    """Stops training once ``minutes`` of training have passed, after an evaluation and a
    checkpoint, so the best checkpoint is still the one kept; ``stopped_at_step`` says when."""

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self.started = 0.0
        self.stopped_at_step: int | None = None

    def on_train_begin(self, *_: Any, **__: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, _args: Any, state: Any, control: Any, **__: Any) -> None:
        if time.perf_counter() - self.started > self.minutes * 60:
            control.should_training_stop = True
            control.should_evaluate = True
            control.should_save = True
            self.stopped_at_step = state.global_step
            log.warning("time budget of %.0f min reached at step %d; stopping",
                        self.minutes, state.global_step)
