"""Step Rehash on a MODEL clone: the run state, the wrappers, and the two nodes (MODEL patch, sampler).

- an OUTER_SAMPLE wrapper gives every sampling run a fresh RehashRun (schedule, caches, counters)
  and drops it in `finally:` (an interrupted run leaves nothing behind);
- a DIFFUSION_MODEL wrapper hands each UNet call a RehashCall (families/unet/forward.py runs the
  shallow path, asks it whether to reuse, and gives it the deep feature to store on full calls).
  With Streamline Model Patch on the same model, both paths run sliced; without it, unsliced;
- a PREDICT_NOISE wrapper marks each model evaluation, and the sampler's callback each finished step, so
  that the calls find their step on the host (core.rehash.StepClock).

No host-device sync per call: the run's sigmas are read once, at its start; a call's step comes from the
sampler's step count (its sigma read at most once per model evaluation, only where the count cannot tell);
calls are timed with CUDA events read once, when the run's report is made (CallTimer). With rehash_mode
off a call goes straight to the model.

Caches are kept per cond/uncond entry (ComfyUI's uuids) and per context window (ADE's, and ComfyUI's own
Context Windows nodes), so batched and unbatched CFG, and every window, reuse their own feature.

Wan 2.1 / 2.2 (families/wan/rehash.py): the pack's block replacements run the first and last blocks on every
step and reuse the residual the blocks between add; apply_rehash installs them (unsliced) when Streamline
has not.

A call Step Rehash cannot split (rehash off, a model other than a plain UNet or Wan, a cache_block the
model does not have) runs exactly as ComfyUI would run it, is counted as a full step, and the report says why.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import comfy.model_patcher
import comfy.patcher_extension
import torch
from torch import Tensor

from ..core.rehash import (
    KeystepRecord, KeystepStore, RehashConfig, RehashConfigError, StepClock,
    change_rate_on_device, feature_sketch, fixed_full_steps, keystep_search, predicted_deep_change,
    reuse_costs, reused_feature, schedule_steps, sketches_to_cpu, store_key, tensor_key,
)
from ..core.slicing import UNSLICED
from ..families import registry as families
from ..families.registry import foreign_reason, unsupported_reason
from ..host.log import LogOnce
from ..host.options import (
    DIT_REHASH_CALL_KEY, REHASH_CALL_KEY, REHASH_KEY as STATE_KEY, REHASH_WRAPPER_KEY as WRAPPER_KEY,
    STREAMLINE_KEY as SLICING_STATE_KEY,
)
from .report import publish

KEYSTEP_FILE = "streamline/keysteps.json"
KEYSTEP_SEARCH_VERSION = "reuse-error-v2"  # part of a saved result's key: results of an older search are not reused

CacheKey = tuple  # (cond uuid, (ADE context-window frame indices, ComfyUI context-window indices))
History = list  # [(sigma, deep feature)] of the last two full calls, oldest first


class RehashPlan(NamedTuple):
    """How Step Rehash runs one model's calls: split at `split_point`, or in full for the reason `why_not`."""

    split_point: int | None = None  # a UNet: the output block cached after; a block stack (DiT): the shallow blocks
    # at each end (families/wan/rehash.py)
    why_not: str = ""
    log_key: str = ""
    family: object | None = None  # the model's family adapter (families/registry.py)


@dataclass
class RehashReport:
    steps: int
    full: int
    rehashed: int
    full_call_seconds: float
    rehash_call_seconds: float
    calls_full: int
    calls_rehashed: int
    note: str = ""

    @property
    def estimated_speedup(self) -> float:
        """Model time if every call had been full, over the model time spent."""
        if not self.calls_full:
            return 1.0
        per_full = self.full_call_seconds / self.calls_full
        spent = self.full_call_seconds + self.rehash_call_seconds
        return (per_full * (self.calls_full + self.calls_rehashed)) / spent if spent > 0 else 1.0

    def text(self) -> str:
        line = f"Step Rehash: {self.full}/{self.steps} steps computed in full, {self.rehashed} rehashed"
        if self.calls_full + self.calls_rehashed:  # not with rehash_mode off: its calls are not timed
            line += (f"; UNet time {self.full_call_seconds + self.rehash_call_seconds:.2f} s, "
                     f"{self.estimated_speedup:.2f}x vs computing every step in full")
        return f"{line}. {self.note}" if self.note else line


class CallTimer:
    """Model time of a run's full and rehash calls. A CUDA call: an event pair recorded on its device's current
    stream around it, read once, by seconds(), when the run's report is made (one synchronize per device and
    run); a CPU call: perf_counter, as it runs in step with the host."""

    def __init__(self):
        self.totals = {False: 0.0, True: 0.0}
        self.pending: list[tuple] = []  # (rehashed, device, start event, end event)

    def start(self, x):
        device = getattr(x, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
            return device, event
        return time.perf_counter()

    def stop(self, started, rehashed: bool) -> None:
        if isinstance(started, tuple):
            device, start = started
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(device))
            self.pending.append((rehashed, device, start, end))
        else:
            self.totals[rehashed] += time.perf_counter() - started

    def seconds(self) -> dict[bool, float]:
        if self.pending:
            for device in {device for _, device, _, _ in self.pending}:
                torch.cuda.synchronize(device)
            for rehashed, _, start, end in self.pending:
                self.totals[rehashed] += start.elapsed_time(end) / 1000.0
            self.pending.clear()
        return dict(self.totals)


@dataclass
class RehashRun:
    """The state of one sampling run (never shared between runs)."""

    config: RehashConfig
    steps: int
    full_steps: set[int] | None  # None: adaptive, or a keystep calibration (every step full)
    rehash_sigma_range: tuple[float, float]  # rehash only for sigmas within [low, high]
    calibrating: KeystepRecord | None = None  # the record a calibration run will save
    deep: dict[CacheKey, History] = field(default_factory=dict)
    shallow: dict[CacheKey, Tensor] = field(default_factory=dict)  # adaptive: at the last full call
    rates: dict[CacheKey, Tensor] = field(default_factory=dict)  # adaptive: change rate of the last two full calls
    # (on the device: read once per step, with the prediction it makes)
    decisions: dict[int, bool] = field(default_factory=dict)  # step -> rehash?
    calibration_key: CacheKey | None = None
    sketches: dict[int, tuple[float, Tensor]] = field(default_factory=dict)  # keystep calibration: step -> (sigma, sketch)
    all_full: bool = False  # every call goes straight to the model, untimed (rehash off, nothing left to rehash)
    notes: list[str] = field(default_factory=list)  # for the report: why steps ran in full, calibration
    plans: dict[int, RehashPlan] = field(default_factory=dict)  # id(model) -> how its calls run
    full_seen: set[int] = field(default_factory=set)
    rehash_seen: set[int] = field(default_factory=set)
    calls: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})
    progress: object | None = None
    clock: StepClock = field(default_factory=StepClock)  # each call's step, found on the host
    evaluations_marked: bool = False  # the PREDICT_NOISE wrapper marks model evaluations (else: each call's sigmas)
    timer: CallTimer = field(default_factory=CallTimer)
    completed: bool = False

    def clear(self) -> None:
        self.deep.clear()
        self.shallow.clear()
        self.rates.clear()
        self.sketches.clear()
        self.clock.release()
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def held_bytes(self) -> int:
        """Device memory the caches keep alive: each storage once (a cond's feature is a view of the batch's)."""
        tensors = [t for history in self.deep.values() for _, t in history] + list(self.shallow.values())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def wants_rehash(self, step: int, sigma: float, key: CacheKey, shallow: Tensor) -> bool:
        """Whether `step` reuses the deep feature; decided once per step, by the step's first call."""
        if step in self.decisions:
            return self.decisions[step]
        low, high = self.rehash_sigma_range
        if step == 0 or not low <= sigma <= high:
            decision = False
        elif self.full_steps is not None:
            decision = step not in self.full_steps
        elif self.calibrating is not None:
            decision = False
        else:  # adaptive; full until two full calls have measured a change rate
            reference, rate = self.shallow.get(key), self.rates.get(key)
            decision = reference is not None and rate is not None and reference.shape == shallow.shape and \
                predicted_deep_change(rate, shallow, reference) < self.config.threshold
        self.decisions[step] = decision
        return decision

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def account(self, step: int, rehashed: bool, started) -> None:
        """A call ran: `started` is what self.timer.start returned before it."""
        self.timer.stop(started, rehashed)
        self.calls[rehashed] += 1
        self.record_step(step, rehashed)

    def record_step(self, step: int, rehashed: bool) -> None:
        first_call_of_step = step not in self.full_seen and step not in self.rehash_seen
        (self.rehash_seen if rehashed else self.full_seen).add(step)
        if self.progress is not None:
            if first_call_of_step:
                self.progress.update(1)
            self.progress.set_postfix(full=len(self.full_seen), rehash=len(self.rehash_seen - self.full_seen))

    def report(self) -> RehashReport:
        """The run's report; on CUDA it reads the calls' timing events (once)."""
        seconds = self.timer.seconds()
        full = len(self.full_seen)
        if self.all_full and not self.full_seen:  # calls went straight to the model: the sampler's steps
            full = self.steps if self.completed else min(self.clock.done, self.steps)
        return RehashReport(self.steps, full, len(self.rehash_seen - self.full_seen),
                            seconds[False], seconds[True], self.calls[False], self.calls[True],
                            " ".join(self.notes))


class RehashCallState:
    """One UNet call's view of the run (implements streamlined_unet.RehashCall)."""

    def __init__(self, run: RehashRun, output_block: int, step: int, sigma: float, keys: list[CacheKey],
                 patched_h: bool = False):
        self.run, self.output_block, self.step, self.sigma, self.keys = run, output_block, step, sigma, keys
        # Output-block patches (FreeU, FreeU_V2) get h, the deep feature, and may write into it (FreeU
        # scales half its channels in place): then the cache keeps a copy of its own, and a rehash step
        # is handed a tensor that is not the cached one.
        self.patched_h = patched_h
        self.rehashed = False
        self.shallow_parts: list[Tensor] = []  # per key, kept for the adaptive reference on a full call

    def _split(self, t: Tensor) -> list[Tensor]:
        return list(t.chunk(len(self.keys))) if len(self.keys) > 1 else [t]

    def reuse(self, shallow_feature: Tensor) -> Tensor | None:
        run = self.run
        shallow = self._split(shallow_feature)
        if not run.wants_rehash(self.step, self.sigma, self.keys[0], shallow[0]):
            self.shallow_parts = shallow
            return None
        histories = [run.deep.get(key) for key in self.keys]
        if any(h is None or h[-1][1].shape[1:] != histories[0][-1][1].shape[1:] for h in histories):
            self.shallow_parts = shallow  # a window or cond without a cache yet: compute it in full
            return None
        self.rehashed = True
        cached = [reused_feature(h, self.sigma, run.config.reuse) for h in histories]
        if len(cached) > 1:
            return torch.cat(cached)
        held = cached[0] is histories[0][-1][1]  # hold (or one full step so far): the cached tensor itself
        return cached[0].clone() if held and self.patched_h else cached[0]

    def store(self, deep_feature: Tensor) -> None:
        run = self.run
        parts = self._split(deep_feature.clone() if self.patched_h else deep_feature)
        keep = 2 if run.config.reuse == "extrapolate" else 1
        if run.config.mode == "adaptive":
            for key, part, shallow in zip(self.keys, parts, self.shallow_parts):
                earlier_deep, earlier_shallow = run.deep.get(key), run.shallow.get(key)
                if earlier_deep and earlier_shallow is not None and earlier_deep[-1][0] != self.sigma:
                    run.rates[key] = change_rate_on_device(part, earlier_deep[-1][1], shallow, earlier_shallow)
                run.shallow[key] = shallow
        for key, part in zip(self.keys, parts):
            history = [entry for entry in run.deep.get(key, []) if entry[0] != self.sigma]
            run.deep[key] = (history + [(self.sigma, part)])[-keep:]
        if run.calibrating is not None:
            if run.calibration_key is None:
                run.calibration_key = self.keys[0]
            if self.keys[0] == run.calibration_key and self.step not in run.sketches:
                # on the device until the run ends (_finish_run reads them at once)
                run.sketches[self.step] = (self.sigma, feature_sketch(parts[0], to_cpu=False))


@dataclass
class LastRun:
    """The report of the latest run (and the run itself, its caches cleared), shared by every copy of
    one patched MODEL's state so that the node that started sampling can read it."""

    report: RehashReport | None = None
    run: RehashRun | None = None


@dataclass
class RehashState:
    """What the patched MODEL carries: the settings; `run` is set only on the per-run copy."""

    config: RehashConfig
    keystep_store: Path | None = None
    log: LogOnce = field(default_factory=LogOnce)
    last: LastRun = field(default_factory=LastRun)
    run: RehashRun | None = None
    node_id: str | None = None  # Step Rehash (Model Patch): the node the browser shows each run's report on

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: copies share the settings and the report
        # sink, never a run's tensors.
        return RehashState(self.config, self.keystep_store, self.log, self.last, node_id=self.node_id)


def _model_key(model_patcher) -> str:
    """The model's identity from the weights that tell it apart (families.registry.identity_weights: a UNet's
    first and last convolution, not its parameter list: AnimateDiff-Evolved injects and removes motion modules
    around each run)."""
    diffusion_model = model_patcher.model.diffusion_model
    return f"{type(diffusion_model).__name__}:" + ":".join(
        tensor_key(w) for w in families.identity_weights(diffusion_model))


def _sampler_name(sampler) -> str:
    """A name that stays the same across runs (ComfyUI may build a new sampler function per run)."""
    function = getattr(sampler, "sampler_function", sampler)
    function = getattr(function, "func", function)  # functools.partial
    return getattr(function, "__qualname__", type(function).__name__)


def _start_run(state: RehashState, guider, sigmas: Tensor, sampler, disable_pbar: bool) -> RehashRun:
    config = state.config
    steps = schedule_steps(sigmas)
    if config.mode == "off":  # nothing to read, count or time: every call goes straight to the model
        run = RehashRun(config, steps, None, (0.0, 0.0), all_full=True)
        run.note("rehash_mode off: every step computed in full.")
        return run
    host_sigmas = sigmas.tolist()  # the run's one read of its schedule; calls find their step on the host
    sampling = guider.model_patcher.model.model_sampling
    high = float(sampling.percent_to_sigma(config.start_percent))
    low = float(sampling.percent_to_sigma(config.end_percent))
    full_steps, calibrating, in_full = None, None, None
    if config.mode == "fixed":
        full_steps = set(fixed_full_steps(steps, config.interval, config.warmup, config.tail))
    elif config.mode == "keystep" and config.full_steps >= steps:
        in_full = (f"keystep: full_steps {config.full_steps} >= the run's {steps} steps, so every step is "
                   "computed in full (no key-step search, nothing saved).")
        state.log.warn(f"keystep-all-full-{steps}", f"Step Rehash: {in_full}")
    elif config.mode == "keystep":
        key = store_key(KEYSTEP_SEARCH_VERSION, _model_key(guider.model_patcher), _sampler_name(sampler),
                          [round(s, 5) for s in host_sigmas], config.split_point, config.full_steps, config.reuse)
        record = KeystepStore(state.keystep_store).get(key) if state.keystep_store else None
        if record is not None and record.steps == steps:
            full_steps = set(record.full_steps)
        else:
            calibrating = KeystepRecord(key, steps, [], [])
    run = RehashRun(config, steps, full_steps, (low, high), calibrating, all_full=in_full is not None,
                    clock=StepClock(host_sigmas))
    if in_full:
        run.note(in_full)
    if not disable_pbar and steps and not run.all_full:
        from tqdm.auto import tqdm

        run.progress = tqdm(total=steps, desc="Step Rehash", unit="step", leave=False)
    return run


def _finish_run(state: RehashState, run: RehashRun, completed: bool, model_name: str = "the model") -> None:
    note = ""
    run.completed = completed
    if completed and run.steps and not run.all_full and not any(run.calls.values()) and not run.notes \
            and run.calibrating is None:
        # the sampler ran, but no call passed the DIFFUSION_MODEL wrapper (ComfyUI's ar_video sampler calls
        # CausalWanModel's blocks itself): the model computed every step in full, which the report says
        run.all_full = True
        why = (f"no call of {model_name} in this run went through ComfyUI's DIFFUSION_MODEL wrapper (its sampler "
               "or forward calls the model's blocks directly)")
        state.log.warn("no-wrapped-call", f"Step Rehash: {why}; every step runs in full.")
        run.note(f"{why}: every step ran in full.")
    if run.calibrating is not None and completed and run.sketches:
        on_cpu = sketches_to_cpu([sketch for _, sketch in run.sketches.values()])
        run.sketches = {step: (sigma, sketch) for (step, (sigma, _)), sketch in zip(run.sketches.items(), on_cpu)}
        sigmas, sketches = zip(*_sketch_per_step(run.sketches, run.steps))
        costs = reuse_costs(sketches, sigmas, state.config.reuse)
        changes = [0.0] + [float(costs[0, t - 1, t]) for t in range(1, run.steps)]
        full = keystep_search(costs, state.config.full_steps)
        record = replace(run.calibrating, full_steps=full, changes=changes)
        if state.keystep_store is not None:
            KeystepStore(state.keystep_store).put(record)
        note = (f"Calibration run (all steps full); key steps for next runs with these settings: {full}"
                + (f" (saved to {state.keystep_store})." if state.keystep_store else "."))
    elif run.calibrating is not None:
        note = "Calibration saw no UNet call; nothing saved." if completed else "Calibration interrupted; nothing saved."
    if note:
        run.note(note)
    run.clear()
    state.last.report, state.last.run = run.report(), run
    publish(state.last.report.text(), state.node_id)


def _sketch_per_step(sketches: dict[int, tuple], steps: int) -> list[tuple]:
    """One sketch per step; a step the sampler never evaluated counts as unchanged from the one before."""
    first = sketches[min(sketches)]
    per_step, last = [], first
    for t in range(steps):
        last = sketches.get(t, last)
        per_step.append(last)
    return per_step


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                         disable_pbar=False, seed=None, **kwargs):
    guider = executor.class_obj
    original_options = guider.model_options
    state: RehashState = original_options["transformer_options"][STATE_KEY]
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    run = _start_run(state, guider, sigmas, sampler, disable_pbar)
    run_state = RehashState(state.config, state.keystep_store, state.log, state.last, run, state.node_id)
    guider.model_options["transformer_options"][STATE_KEY] = run_state
    foreign = foreign_reason(guider.model_patcher.model.diffusion_model)
    if foreign is not None and not run.all_full:  # said here: some such forwards run no DIFFUSION_MODEL wrapper
        _say_full(run_state, foreign, "model-unsupported")

    def step_done(step, x0, x, total_steps):  # the sampler's count of finished steps, on the host
        run.clock.step_done(step)
        if callback is not None:
            return callback(step, x0, x, total_steps)

    completed = False
    try:
        out = executor(noise, latent_image, sampler, sigmas, denoise_mask, step_done, disable_pbar, seed, **kwargs)
        completed = True
        return out
    finally:
        _finish_run(state, run, completed, type(guider.model_patcher.model.diffusion_model).__name__)
        guider.model_options = original_options


def _window_of(transformer_options: dict) -> tuple:
    """The context window a call computes: ADE's frame indices (ad_params.sub_idxs) and ComfyUI's own
    (comfy/context_windows.py puts the window it evaluates in transformer_options["context_window"])."""
    ade = (transformer_options.get("ad_params") or {}).get("sub_idxs") or ()
    core = getattr(transformer_options.get("context_window"), "index_list", None) or ()
    return tuple(int(i) for i in ade), tuple(int(i) for i in core)


def _cache_keys(transformer_options: dict, batch: int) -> list[CacheKey]:
    uuids = transformer_options.get("uuids") or [None]
    if batch % len(uuids):
        uuids = [None]
    window = _window_of(transformer_options)
    return [(uuid, window) for uuid in uuids]


def _transformer_options_in(args: tuple, kwargs: dict) -> dict:
    """A model call's transformer_options, wherever its forward signature puts them (UNetModel: 6th
    argument; Wan, LTXV, Flux: elsewhere): the argument that carries Step Rehash's state."""
    for value in (kwargs.get("transformer_options"), *args):
        if isinstance(value, dict) and STATE_KEY in value:
            return value
    return {}


def _rehash_plan(run: RehashRun, model) -> RehashPlan:
    """How Step Rehash runs `model`'s calls in this run (checked once per run and model)."""
    if id(model) not in run.plans:
        run.plans[id(model)] = _plan(model, run.config)
    return run.plans[id(model)]


def _plan(model, config: RehashConfig) -> RehashPlan:
    reason = unsupported_reason(model, "rehash")  # another architecture, or a DiT the pack does not split
    if reason is not None:
        return RehashPlan(why_not=reason, log_key="model-unsupported")
    try:
        family = families.family_of(model)
        return RehashPlan(family.rehash_split(model, config.split_point), family=family)
    except RehashConfigError as e:
        return RehashPlan(why_not=str(e), log_key="cache-block")


def _step_and_sigma(transformer_options: dict) -> tuple[int, float]:
    """The call's step and sigma, from the run's StepClock: on the host where the sampler's step count tells,
    else from the call's sigma, read once per model evaluation."""
    run: RehashRun = transformer_options[STATE_KEY].run
    clock = run.clock
    if clock.sigmas is None:  # a run not started by outer_sample_wrapper: the schedule the call carries
        sample_sigmas = transformer_options.get("sample_sigmas")
        clock.sigmas = sample_sigmas.tolist() if isinstance(sample_sigmas, Tensor) else []
    if not run.evaluations_marked:
        clock.begin(transformer_options.get("sigmas"))
    return clock.locate(lambda: _sigma_of(transformer_options))


def _sigma_of(transformer_options: dict) -> float:
    sigmas = transformer_options.get("sigmas")
    return float(sigmas.max()) if sigmas is not None else 0.0


def _input_of(args: tuple, kwargs: dict):
    """The call's first input tensor (a model that takes several latents, MiniMax H3's [video, audio]: the first)."""
    x = args[0] if args else kwargs.get("x")
    while x is not None and not isinstance(x, Tensor):
        x = x.tensors[0] if hasattr(x, "tensors") else x[0]
    return x


def predict_noise_wrapper(executor, *args, **kwargs):
    """Marks a model evaluation (all the UNet calls of one sampler call: cond and uncond, context windows) for
    the run's StepClock: its calls share one step and sigma."""
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    model_options = (args[2] if len(args) > 2 else kwargs.get("model_options")) or {}
    state = (model_options.get("transformer_options") or {}).get(STATE_KEY)
    run = getattr(state, "run", None)
    if run is not None and not run.all_full:
        run.evaluations_marked = True
        run.clock.begin(timestep)
    return executor(*args, **kwargs)


def _say_full(state: RehashState, why: str, log_key: str) -> None:
    state.log.warn(log_key, f"Step Rehash: {why}; every step runs in full.")
    state.run.note(f"{why}: every step ran in full.")


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Runs a UNet call with Step Rehash. A call it cannot split runs as received, `executor(*args,
    **kwargs)` (other models' forwards take other arguments), and counts as a full step. With rehash_mode
    off (or nothing to rehash) the call goes straight to the model: nothing is read, counted or timed."""
    transformer_options = _transformer_options_in(args, kwargs)
    state: RehashState | None = transformer_options.get(STATE_KEY)
    run = state.run if state is not None else None
    if run is None or run.all_full:
        return executor(*args, **kwargs)
    plan = _rehash_plan(run, executor.class_obj)
    if plan.split_point is None:
        if plan.why_not:
            _say_full(state, plan.why_not, plan.log_key)
        step, _ = _step_and_sigma(transformer_options)
        started = run.timer.start(_input_of(args, kwargs))
        out = executor(*args, **kwargs)
        run.account(step, False, started)
        return out
    if plan.family.splits_block_stack:
        return _rehash_block_stack_call(executor, state, plan.family, plan.split_point, transformer_options, args,
                                        kwargs)
    return _rehash_unet_call(executor, state, plan.family, plan.split_point, *args, **kwargs)


def _rehash_block_stack_call(executor, state: RehashState, family, shallow: int, transformer_options: dict,
                             args: tuple, kwargs: dict):
    """A DiT call (Wan) with the family's rehash call in a per-call copy of transformer_options: the pack's
    block replacements (families/wan/patch.py) run the shallow blocks, and the deep ones or the reused residual."""
    run, model = state.run, executor.class_obj
    x = family.call_input(model, args, kwargs)
    step, sigma = _step_and_sigma(transformer_options)
    first_deep, last_deep = shallow, family.block_stack_length(model) - 1 - shallow
    rehash_call = RehashCallState(run, shallow, step, sigma, _cache_keys(transformer_options, x.shape[0]))
    why = family.rehash_conflict(transformer_options, first_deep, last_deep)
    if why is not None:  # this call runs in full, as received
        state.log.warn(f"wan-full-{why}", f"Step Rehash: {why}; every step runs in full.")
        run.note(f"{why}: every step ran in full.")
    else:
        options = {**transformer_options, DIT_REHASH_CALL_KEY: family.rehash_call(rehash_call, first_deep, last_deep)}
        args = tuple(options if a is transformer_options else a for a in args)
        kwargs = {k: options if v is transformer_options else v for k, v in kwargs.items()}
    started = run.timer.start(x)
    out = executor(*args, **kwargs)
    run.account(step, rehash_call.rehashed, started)
    return out


def _rehash_unet_call(executor, state: RehashState, family, output_block: int, x, timesteps=None, context=None,
                      y=None, control=None, transformer_options=None, **kwargs):
    """A UNetModel call with a RehashCall in transformer_options: the shallow path, and the deep one or
    the cached deep feature."""
    transformer_options = {} if transformer_options is None else transformer_options
    run, unet = state.run, executor.class_obj
    step, sigma = _step_and_sigma(transformer_options)
    patched_h = bool(transformer_options.get("patches", {}).get("output_block_patch"))
    rehash_call = RehashCallState(run, output_block, step, sigma, _cache_keys(transformer_options, x.shape[0]),
                                  patched_h)
    transformer_options[REHASH_CALL_KEY] = rehash_call
    started = run.timer.start(x)
    try:
        if SLICING_STATE_KEY in transformer_options:  # Streamline Model Patch runs the forward
            out = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        else:
            log = state.log
            unet_forward = family.unsliced_forward()

            def forward(*args, **kw):
                return unet_forward(unet, UNSLICED, log, *args, **kw)

            out = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                forward, unet, executor.wrappers, idx=executor.idx + 1
            ).execute(x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        transformer_options.pop(REHASH_CALL_KEY, None)
    run.account(step, rehash_call.rehashed, started)
    return out


def default_keystep_store() -> Path | None:
    try:
        import folder_paths

        return Path(folder_paths.get_user_directory()) / KEYSTEP_FILE
    except Exception:  # no user directory (e.g. a bare script): key steps are not saved
        return None


def apply_rehash(model, config: RehashConfig, keystep_store: Path | None = None, node_id: str | None = None):
    """A clone of `model` that samples with Step Rehash; `model` itself is left as it was. Each run's
    report goes to the log and, given the node's `node_id`, to that node in the browser."""
    patched = model.clone()
    store = keystep_store if keystep_store is not None else default_keystep_store()
    patched.model_options["transformer_options"][STATE_KEY] = RehashState(config, store, node_id=node_id)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                          (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, predict_noise_wrapper),
                          (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper)):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    family = families.family_of(patched.model.diffusion_model)
    if family is not None:
        family.install_rehash(patched)  # DiT: the block replacements that split a call (unsliced without Streamline)
    return patched


def remove_rehash(model):
    plain = model.clone()
    plain.model_options["transformer_options"].pop(STATE_KEY, None)
    for kind in (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                 comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL):
        plain.remove_wrappers_with_key(kind, WRAPPER_KEY)
    return plain
