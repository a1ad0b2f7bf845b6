"""bench_train_step.py's timing harness: CUDA-synchronised step timing, medians, per-phase breakdowns."""

import statistics
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timeline:
    """Named marks inside a step (CUDA events on the GPU, host clock on the CPU); the time from a mark to
    the next is charged to the mark's label (summed over repeats). Inactive unless started."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.active = False
        self.marks = []

    def start(self, label):
        self.active, self.marks = True, []
        self.mark(label)

    def mark(self, label):
        if not self.active or (self.marks and self.marks[-1][0] == label):
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def seen(self, label):
        return any(name == label for name, _ in self.marks)

    def stop(self):
        self.mark("end")
        self.active = False
        if self.cuda:
            torch.cuda.synchronize()
        phases = {}
        for (label, a), (_, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            phases[label] = phases.get(label, 0.0) + ms
        return phases


def step_loss(result):
    """The loss a provider's step returned: A's logs dict, B's list of per-micro-batch metrics."""
    if isinstance(result, dict):
        return float(result["loss"])
    return float(result[0]["loss"])


def wall_times(fn, device, warmup, runs):
    """fn's first call: its result and wall time in s (torch.compile compiles there); then, after warmup - 1
    more calls, the wall time in ms of each of `runs` calls, each from a synchronised device to a
    synchronised device."""
    synchronize(device)
    start = time.perf_counter()
    first = fn()
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return first, first_s, times


def timed(fn, device, runs, warmup=2):
    """(seconds of the first call, median ms of runs calls after warmup more)."""
    _, first_s, times = wall_times(fn, device, warmup + 1, runs)
    return first_s, statistics.median(times)


def time_steps(step, device, warmup, steps, back_to_back=0):
    """Per-step wall times (each from a synchronised device to a synchronised device) after `warmup`
    steps; also the first step's wall time (torch.compile compiles there) and loss (every provider
    starts from the same weights, data order and draws), and, when back_to_back, the mean time of that
    many steps issued without a synchronisation between them (what a training loop sees)."""
    first, first_s, times = wall_times(step, device, warmup, steps)
    pipelined = None
    if back_to_back:
        start = time.perf_counter()
        for _ in range(back_to_back):
            step()
        synchronize(device)
        pipelined = (time.perf_counter() - start) * 1e3 / back_to_back
    return times, first_s, step_loss(first), pipelined


def breakdown(step, timeline, device, runs):
    """Median per-phase time over `runs` extra steps with the marks on."""
    per_phase = {}
    order = []
    for _ in range(runs):
        timeline.start("data + VAE encode")
        step()
        phases = timeline.stop()
        for label, ms in phases.items():
            if label not in per_phase:
                per_phase[label] = []
                order.append(label)
            per_phase[label].append(ms)
    return [(label, statistics.median(per_phase[label])) for label in order]


# ---- provider A: the LCD script's step ----------------------------------------------------------------
