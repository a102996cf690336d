"""Step Rehash keeps the device out of the hot path: no host-device synchronisation per model call.

A device sync on the CPU path is counted as what would be one on a GPU: torch.cuda.synchronize (wrapped), and
every read of a tensor's value on the host (Tensor.item, .cpu, .tolist, .numpy, .nonzero, float(), int(),
bool(), operator.index()). Counts are taken over a whole sampling run through ComfyUI's KSampler path on TinyVideo
(euler: one model evaluation per step, CFG batched) and compared with the same run without Step Rehash, so
what ComfyUI reads itself is left out:
- rehash_mode off: exactly what plain sampling reads, and no synchronize;
- a rehash mode: a few reads per run (the schedule, the first three evaluations' sigmas, which confirm the
  step count kept on the host), the same number at 6 and at 12 steps, never one per call; on Wan (TinyWan)
  as on the UNet. adaptive reads one value a step, the prediction that decides it.
CUDA timing is checked with stand-in events: recorded around every call, read once when the report is made.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.host

SIZE = 8  # TinyVideo latent height = width (the counts are per call and per run, not per value)
FRAMES = 4
SEED = 5
PROMPT = "red circle bounce"
READS = ("item", "cpu", "tolist", "numpy", "nonzero", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture(scope="module")
def tinyvideo():
    from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader

    return TinyVideoLoader.execute().result[0]


def patch(model, **config):
    from comfyui_streamline.core.rehash import RehashConfig
    from comfyui_streamline.techniques.rehash import apply_rehash

    store = config.pop("store", None)
    return apply_rehash(model, RehashConfig(**config), keystep_store=store)


@contextmanager
def counting_reads(monkeypatch):
    """Counts host reads of tensor values and torch.cuda.synchronize calls while the block runs."""
    counts = Counter()

    def counted(name, original):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        m.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))
        yield counts


def sample(model, steps: int, sampler="euler"):
    import comfy.sample

    from comfyui_streamline.nodes.tinyvideo import TinyVideoPrompt

    positive = TinyVideoPrompt.execute(model, PROMPT).result[0]
    negative = TinyVideoPrompt.execute(model, "").result[0]
    latent = torch.zeros(FRAMES, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 5.0, sampler, "normal", positive, negative, latent,
                                   disable_pbar=True, seed=SEED)


def reads_of(model, steps: int, monkeypatch, sampler="euler") -> Counter:
    sample(model, steps, sampler)  # a first run loads the model and fills ComfyUI's caches
    with counting_reads(monkeypatch) as counts:
        sample(model, steps, sampler)
    return counts


def extra(counts: Counter, baseline: Counter) -> dict:
    """What a run read beyond plain sampling's, per kind (negative: fewer)."""
    return {k: counts[k] - baseline[k] for k in set(counts) | set(baseline) if counts[k] != baseline[k]}


def test_rehash_off_reads_nothing_and_never_synchronizes(tinyvideo, monkeypatch):
    for steps in (6, 12):
        plain = reads_of(tinyvideo, steps, monkeypatch)
        off = reads_of(patch(tinyvideo, mode="off"), steps, monkeypatch)
        assert extra(off, plain) == {}, (steps, off, plain)
        assert off["synchronize"] == 0


@pytest.mark.parametrize("config, most", [
    (dict(mode="fixed", interval=2, warmup=1, tail=1), 4),  # the schedule; 3 sigmas, until the step count confirms
    (dict(mode="fixed", interval=3, warmup=2, tail=1, reuse="hold"), 4),
    (dict(mode="keystep", full_steps=3), 8),  # and the model's fingerprint (its first and last weights' samples)
])
def test_a_rehash_mode_reads_a_few_values_per_run_not_per_call(tinyvideo, monkeypatch, tmp_path, config, most):
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY

    extras = {}
    for steps in (6, 12):
        plain = reads_of(tinyvideo, steps, monkeypatch)
        # keystep: the uncounted first run calibrates; the counted one runs the saved key steps
        model = patch(tinyvideo, store=tmp_path / f"keysteps-{steps}.json", **config)
        extras[steps] = extra(reads_of(model, steps, monkeypatch), plain)
        report = model.model_options["transformer_options"][STATE_KEY].last.report
        assert report.rehashed > 0 and report.full + report.rehashed == steps, report
    assert extras[6] == extras[12], extras  # per run, not per step or call
    assert sum(extras[6].values()) <= most and extras[6].get("synchronize", 0) == 0, extras


def test_adaptive_reads_one_value_per_step_the_prediction_that_decides_it(tinyvideo, monkeypatch):
    """adaptive decides each step from a device value (the deep feature's predicted change): one read a step,
    once two full steps have measured a change rate (kept on the device)."""
    extras = {}
    for steps in (6, 12):
        plain = reads_of(tinyvideo, steps, monkeypatch)
        extras[steps] = extra(reads_of(patch(tinyvideo, mode="adaptive", threshold=0.3), steps, monkeypatch), plain)
    per_run = {k: v for k, v in extras[6].items() if k != "item"}
    assert {k: v for k, v in extras[12].items() if k != "item"} == per_run and sum(per_run.values()) <= 4, extras
    assert 0 < extras[6]["item"] <= 6 - 2 and extras[12]["item"] - extras[6]["item"] <= 6, extras


def test_wan_calls_read_nothing_per_call(monkeypatch):
    from comfyui_streamline.nodes.tinyvideo import TinyWanLoader, sample_clip

    wan = TinyWanLoader.execute().result[0]

    def reads(model, steps):
        sample_clip(model, PROMPT, frames=4, size=SIZE, steps=steps, cfg=5.0)
        with counting_reads(monkeypatch) as counts:
            sample_clip(model, PROMPT, frames=4, size=SIZE, steps=steps, cfg=5.0)
        return counts

    extras = {}
    for steps in (4, 8):
        plain = reads(wan, steps)
        assert extra(reads(patch(wan, mode="off"), steps), plain) == {}
        extras[steps] = extra(reads(patch(wan, mode="fixed", interval=2, warmup=1, tail=1), steps), plain)
    assert extras[4] == extras[8] and sum(extras[4].values()) <= 4, extras


SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "lms", "uni_pc", "lcm", "ddim", "sa_solver",  # one a step
            "heun", "heunpp2", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde", "sa_solver_pece", "dpm_adaptive")


def test_steps_found_on_the_host_are_the_steps_the_sigmas_say(tinyvideo, monkeypatch):
    """Each call's step and sigma, found from the sampler's step count on the host, against the step and sigma
    read from the call's own sigma tensor (the way Step Rehash found them before), for samplers with one model
    evaluation per step and with several (midpoints, heun's next-step evaluation, sa_solver_pece's corrector
    evaluation at the step it reported, dpm_adaptive's own steps). Where they differ, the call ran at the found
    step's sigma to float precision: dpmpp_2s_ancestral's midpoint is sigmas[i + 1] exactly in real numbers,
    and read from the device it lands on either side of it."""
    from comfyui_streamline.core.rehash import step_index
    from comfyui_streamline.techniques import rehash as step_rehash

    seen = []
    real = step_rehash._step_and_sigma

    def both(transformer_options):
        found = real(transformer_options)
        sigma = float(transformer_options["sigmas"].max())
        schedule = transformer_options["sample_sigmas"].tolist()
        seen.append((found, (step_index(schedule, sigma), sigma), schedule))
        return found

    monkeypatch.setattr(step_rehash, "_step_and_sigma", both)
    model = patch(tinyvideo, mode="fixed", interval=2, warmup=1, tail=1)
    for sampler in SAMPLERS:
        seen.clear()
        sample(model, 6, sampler)
        assert seen, sampler
        for (step, sigma), (read_step, read_sigma), schedule in seen:
            assert (step, sigma) == (read_step, pytest.approx(read_sigma, rel=1e-6)) or \
                (sigma == schedule[step] and read_sigma == pytest.approx(sigma, rel=1e-4)), (sampler, seen)
        if sampler in SAMPLERS[:8]:  # one evaluation a step: the first three read, the other three on the host
            assert state_of_run(model).clock.reads == 3, sampler


def state_of_run(model):
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY

    return model.model_options["transformer_options"][STATE_KEY].last.run


def test_the_step_clock_takes_steps_from_the_host_only_once_the_sampler_has_confirmed_its_count():
    from comfyui_streamline.core.rehash import StepClock

    sigmas = [8.0, 4.0, 2.0, 1.0, 0.5, 0.0]

    def run(evaluations: list[list[float]]) -> tuple[list, int]:
        """evaluations[i]: the sigmas the sampler evaluates the model at before reporting step i done."""
        clock, found = StepClock(sigmas), []
        for step, at in enumerate(evaluations):
            for sigma in at:
                clock.begin(object())
                found.append(clock.locate(lambda: sigma))
                clock.begin(clock.marker)  # the evaluation's second call: the same evaluation
                assert clock.locate(lambda: pytest.fail("read twice")) == found[-1]
            clock.step_done(step)
        return found, clock.reads

    euler = [[s] for s in sigmas[:-1]]
    assert run(euler) == ([(i, s) for i, s in enumerate(sigmas[:-1])], 3)
    # heun: the second evaluation of step i, after its report, is at sigmas[i + 1]
    heun = [[8.0], [4.0, 4.0], [2.0, 2.0], [1.0, 1.0], [0.5, 0.5]]
    assert run(heun) == ([(0, 8.0), (1, 4.0), (1, 4.0), (2, 2.0), (2, 2.0), (3, 1.0), (3, 1.0), (4, 0.5),
                          (4, 0.5)], 7)
    # a corrector evaluation at the step just reported: never confirmed, every evaluation read
    pece = [[8.0], [4.0], [4.0, 2.0], [2.0, 1.0], [1.0, 0.5]]
    assert run(pece) == ([(0, 8.0), (1, 4.0), (1, 4.0), (2, 2.0), (2, 2.0), (3, 1.0), (3, 1.0), (4, 0.5)], 8)
    # midpoints: the first evaluation after a report lies between two sigmas
    midpoint = [[8.0, 6.0], [4.0, 3.0], [2.0, 1.5], [1.0, 0.7], [0.5]]
    assert run(midpoint)[0] == [(0, 8.0), (0, 6.0), (1, 4.0), (1, 3.0), (2, 2.0), (2, 1.5), (3, 1.0), (3, 0.7),
                                (4, 0.5)]


class FakeEvent:
    """torch.cuda.Event's part the timer uses, with a clock it sets itself."""

    clock = 0.0
    recorded = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self, stream=None):
        FakeEvent.clock += 0.25
        self.at = FakeEvent.clock
        FakeEvent.recorded.append(self)

    def elapsed_time(self, end):  # milliseconds, as CUDA's
        assert FakeEvent.synchronized, "an event read before the device was synchronized"
        return (end.at - self.at) * 1000.0


class CudaLike:
    device = torch.device("cuda", 0)


def test_cuda_calls_are_timed_with_events_read_once_when_the_report_is_made(monkeypatch):
    from comfyui_streamline.techniques import rehash as step_rehash

    syncs = []
    FakeEvent.recorded, FakeEvent.synchronized = [], False

    def synchronize(device=None):
        syncs.append(device)
        FakeEvent.synchronized = True

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    timer = step_rehash.CallTimer()
    for rehashed in (False, True, True, False):
        started = timer.start(CudaLike())
        timer.stop(started, rehashed)
    assert syncs == [] and len(FakeEvent.recorded) == 8
    assert timer.seconds() == {False: 0.5, True: 0.5} and len(syncs) == 1
    assert timer.seconds() == {False: 0.5, True: 0.5} and len(syncs) == 1  # read once: settled
