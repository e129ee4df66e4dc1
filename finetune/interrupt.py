"""Ctrl-C during fine-tuning: a checkpoint at the end of the step, then a clean stop; the same
command resumes."""

from __future__ import annotations

import signal

from transformers import TrainerCallback


class StopOnSignal(TrainerCallback):
    """Ctrl-C asks for a checkpoint at the end of the current step, then a clean stop."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def install(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, *_):
        if self.stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step with a checkpoint (Ctrl-C again to abort)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop:
            control.should_save = True
            control.should_training_stop = True
        return control
