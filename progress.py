"""How long a training run takes: one early estimate, then the remaining time on the progress bar.

The seconds per step leave out the first step (compilation, data-loader workers starting). A validation
counts as forward passes over its slices, a third of a training step each (a backward pass costs about two
forward passes), until one has been timed. The device is waited for only when the estimate is made.
"""
import time

import torch
from tqdm import tqdm

import training


def duration(seconds):
    """'11 h 20 min', '3 min 5 s', '40 s': as precise as a person plans"""
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {s} s" if minutes else f"{s} s"


class Estimate:
    """the run's wall time; `validations`: the steps after which a validation of `val_slices` slices runs"""

    def __init__(self, run, validations=(), val_slices=0):
        self.run, self.validations, self.val_slices = run, list(validations), val_slices
        self.val_s, self.val_spent, self.said = None, 0.0, False  # a validation's seconds, once timed
        self.marks = [(self.clock(), run.step)]  # now, then after this invocation's first step

    def clock(self):
        if self.run.env.device.type == "cuda":  # the host runs ahead of the device: wait for it
            torch.cuda.synchronize()
        return time.perf_counter()

    def seconds_per_step(self):
        """from the first step on, the first left out once a later one is timed; validations left out"""
        t, step = self.marks[-1] if self.run.step > self.marks[-1][1] else self.marks[0]
        return (time.perf_counter() - t - self.val_spent) / max(1, self.run.step - step)

    def validation_s(self, seconds_per_step):
        if self.val_s is not None:
            return self.val_s
        return self.val_slices * seconds_per_step / (self.run.args.batch_size * self.run.env.world_size) / 3

    def step(self, end_of_epoch):
        """after every step, on every rank: starts the clock after the first; after the third (or at the end
        of the first epoch) rank 0 says the estimate"""
        run, done = self.run, self.run.step - self.run.start_step
        if done == 1:
            self.marks.append((self.clock(), run.step))
        if not self.said and (done >= 3 or end_of_epoch):
            self.said = True
            self.clock()  # the steps still queued on the device belong to the time
            seconds = self.seconds_per_step()
            whole = run.total_steps * seconds + len(self.validations) * self.validation_s(seconds)
            if run.env.main:
                tqdm.write(f"estimated {duration(whole)} for {run.args.epochs} epoch{'s' * (run.args.epochs > 1)} "
                           f"({run.args.batch_size * run.env.world_size / seconds:.1f} images/s on "
                           f"{training.device_name(run.env.device)})")

    def validated(self, seconds):
        self.val_s, self.val_spent = seconds, self.val_spent + seconds

    def left(self):
        """the run's remaining time, for the progress bar"""
        later, seconds = sum(s >= self.run.step for s in self.validations), self.seconds_per_step()
        return duration((self.run.total_steps - self.run.step) * seconds + later * self.validation_s(seconds))
