"""What the node reports on ``/diagnostics``: its key/values, and one level with its reason.

ERROR while loading, and when a forward pass has run for ``STUCK_ERROR_S`` (a hung device);
WARN when a forward pass has run far longer than the model takes (``stuck_after_s``), when most
of a camera's images never reached the node since the last report, when a camera's images
arrived but none of them was published (all rejected or too old), when a camera's frames got no
depth (depth.enabled), on errors of the inference thread (inference errors, CUDA out of memory,
internal errors, service timeouts) in the last ``ERROR_WINDOW_S`` seconds, or with no input; OK
otherwise (a single error long ago does not keep the node in WARN: the counters keep the
history). Cameras are judged one by one, so one broken camera among working ones is not hidden
by their results.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Optional, Sequence

from toist_ros.diagnostics import ERROR, OK, WARN, Counters, Percentiles, device_memory, fmt_ms

ERROR_WINDOW_S = 30.0        # inference errors keep the level at WARN this long
STUCK_MIN_S = 10.0           # a forward pass this long (and 5x the model's p95) is reported as stuck
STUCK_ERROR_S = 120.0        # ... and as an ERROR past this
STUCK_RULE = ("5x the model's p95, or its warm-up pass before a frame was timed, at least 10 s; 120 s "
              "when neither is known")
# The errors of the inference thread and its services that keep the level at WARN.
_ERROR_COUNTERS = ("inference_errors", "cuda_oom", "internal_errors", "service_timeouts")


def stuck_after_s(inference_p95_ms: float, warmup_ms: float = float("nan")) -> float:
    """How long a forward pass may run before /diagnostics calls it stuck (:data:`STUCK_RULE`):
    five times the model's p95 (NaN: no frame timed yet), else five times the warm-up pass (NaN:
    none), at least ``STUCK_MIN_S``; ``STUCK_ERROR_S`` when neither is known (a slow model's first
    pass on a CPU may take long)."""
    typical = inference_p95_ms if inference_p95_ms == inference_p95_ms else warmup_ms
    if typical != typical:
        return STUCK_ERROR_S
    return max(STUCK_MIN_S, 5.0 * typical / 1000.0)

# Always reported, 0 until something happens (the rejected_<reason> counters follow them).
_COUNTERS = ("received", "processed", "dropped_replaced", "dropped_out_of_order", "dropped_abandoned", "skipped_stale",
             "future_stamped", "lost_in_transport", "rejected", "inference_errors", "cuda_oom", "rejected_service",
             "service_timeouts", "internal_errors", "qos_incompatible", "qos_switches", "loss_warnings",
             "no_image_warnings", "debug_images", "debug_errors", "service_calls")


# Reported with depth.enabled, 0 until something happens (depth_rejected_<reason> follow them).
_DEPTH_COUNTERS = ("depth_received", "depth_paired", "depth_missing", "depth_unsynced", "depth_evicted",
                   "depth_rejected", "camera_info_rejected", "instances_3d")


def report_values(*, ready: bool, task: Any, model: Any, counters: Counters, inference_ms: Percentiles,
                  latency_ms: Percentiles, cameras: Sequence[Any], dropped: Sequence[int],
                  out_of_order: Sequence[int], geometry_ms: Optional[Percentiles] = None,
                  busy_s: float = 0.0, warmup_ms: float = float("nan")) -> dict[str, Any]:
    """The flat report: task, model, timings, per camera rates and drops, counters, memory.
    ``dropped`` / ``out_of_order``: frames replaced in each camera's slot / dropped as older than
    one already put, indexed like ``cameras``; ``geometry_ms``: the 3D step's time per frame
    (None: depth is off, no depth keys); ``busy_s``: how long the forward pass in progress has
    run (0: none); ``warmup_ms``: the warm-up pass (NaN: none)."""
    counts = counters.snapshot()
    inf50, inf95 = inference_ms.quantiles(0.5, 0.95)
    lat50, lat95 = latency_ms.quantiles(0.5, 0.95)
    values: dict[str, Any] = {
        "ready": ready, "task": task.caption, "task revision": task.revision,
        "model": model.description, "device": model.device,
        "inference ms p50": fmt_ms(inf50), "inference ms p95": fmt_ms(inf95),
        "latency ms p50": fmt_ms(lat50), "latency ms p95": fmt_ms(lat95),
        "forward pass running s": f"{busy_s:.1f}", "stuck after s": f"{stuck_after_s(inf95, warmup_ms):.1f}",
    }
    for camera in cameras:
        name = camera.subscribed_name
        values[f"{name} input Hz"] = f"{camera.input_rate.rate():.2f}"
        values[f"{name} output Hz"] = f"{camera.output_rate.rate():.2f}"
        values[f"{name} dropped (replaced)"] = dropped[camera.index]
        values[f"{name} dropped (out of order)"] = out_of_order[camera.index]
        values[f"{name} published"] = camera.output_rate.count
        values[f"{name} rejected"] = camera.rejected
        values[f"{name} skipped stale"] = camera.skipped_stale
        values[f"{name} arrived"] = camera.arrived
        values[f"{name} lost in transport"] = camera.lost
    for key in _COUNTERS:
        values[key] = counts.get(key, 0)
    for key in sorted(k for k in counts if k.startswith("rejected_") and k != "rejected_service"):
        values[key] = counts[key]
    if geometry_ms is not None:
        for camera in cameras:
            for outcome, count in camera.depth_outcomes.items():
                values[f"{camera.subscribed_name} depth {outcome}"] = count
        g50, g95 = geometry_ms.quantiles(0.5, 0.95)
        values["3d ms p50"], values["3d ms p95"] = fmt_ms(g50), fmt_ms(g95)
        for key in _DEPTH_COUNTERS:
            values[key] = counts.get(key, 0)
        for key in sorted(k for k in counts if k.startswith("depth_rejected_")):
            values[key] = counts[key]
    values.update(device_memory(model.device))
    return values


class HealthLevel:
    """The report's level and message; remembers the arrivals at the last report, so that "most
    images lost" is judged on what happened since then."""

    def __init__(self) -> None:
        self._previous_arrivals: dict[str, tuple[int, int]] = {}  # per camera: (arrived, lost) at the last report
        self._previous_depth: dict[str, tuple[int, int, int]] = {}  # per camera: (paired, missing, unsynced)
        # at the last report
        self._previous_outcomes: dict[str, tuple[int, int, int]] = {}  # per camera: (published, rejected,
        # skipped stale) at the last report
        self._errors: collections.deque = collections.deque()  # (monotonic time, error total) per report

    def judge(self, values: dict[str, Any], *, ready: bool, last_error: str, receiving: bool,
              cameras: Sequence[str], now: Optional[float] = None) -> tuple[int, str]:
        """(level, message) for ``values`` (from :func:`report_values`). ``last_error``: the last
        inference error ("" when none); ``receiving``: whether any camera delivers images now;
        ``cameras``: the input topics ``values`` reports on; ``now``: monotonic seconds (tests)."""
        now = time.monotonic() if now is None else now
        losses = self._losses(values, cameras)
        errors = sum(values[key] for key in _ERROR_COUNTERS)
        self._errors.append((now, errors))
        while len(self._errors) > 1 and self._errors[1][0] <= now - ERROR_WINDOW_S:
            self._errors.popleft()
        # Errors since the oldest report inside the window (or since start, early on).
        recent_errors = errors - (self._errors[0][1] if self._errors[0][0] <= now - ERROR_WINDOW_S else 0)
        depth_problem = self._depth_problem(values, cameras)
        nothing_published = self._nothing_published(values, cameras)
        if not ready:
            return ERROR, "not ready"
        busy, limit = float(values["forward pass running s"]), float(values["stuck after s"])
        if busy > limit:
            # Frames keep arriving and are replaced, which alone is no fault: nothing else said it.
            return (ERROR if busy > max(STUCK_ERROR_S, limit) else WARN), (
                f"a forward pass has run for {busy:.0f} s (stuck after {limit:.0f} s: {STUCK_RULE}): the device or "
                "the model may hang; nothing is published meanwhile")
        if losses:
            return WARN, losses
        if nothing_published:
            return WARN, nothing_published
        if depth_problem:
            return WARN, depth_problem
        if recent_errors > 0:
            return WARN, (f"{recent_errors} error(s) of the inference thread or its services in the last "
                          f"{ERROR_WINDOW_S:.0f} s (inference_errors, cuda_oom, internal_errors, service_timeouts; "
                          f"last inference error: {last_error or 'none'})")
        if not receiving:
            return WARN, "no input images"
        return OK, "running"

    def _losses(self, values: dict[str, Any], cameras: Sequence[str]) -> str:
        """The cameras most of whose images never reached the node since the last report (""
        when none): per camera, as the node-wide totals let one healthy camera hide a lossy one."""
        reasons = []
        for name in cameras:
            now = (values[f"{name} arrived"], values[f"{name} lost in transport"])
            before = self._previous_arrivals.get(name)
            self._previous_arrivals[name] = now
            if before is None or now[0] < before[0]:   # a camera made anew (cleanup, configure): from zero
                arrived, lost = now
            else:   # a loss taken back (a frame decoded late) lowers the count: none, not a new camera
                arrived, lost = now[0] - before[0], max(0, now[1] - before[1])
            if lost > max(arrived, 2):
                reasons.append(f"most images on {name} never reached the node ({lost} lost, {arrived} arrived since "
                               "the last report): DDS transport or QoS (see docs/ros.md)")
        return "; ".join(reasons)

    def _nothing_published(self, values: dict[str, Any], cameras: Sequence[str]) -> str:
        """Why a camera published no frame since the last report although its frames came ("" when
        each camera published one, or turned none away): the node runs, yet that camera's users get
        nothing. Per camera, because the other cameras' results would hide it in the totals.
        (Frames replaced by newer ones are no fault: a camera served in turn, or a model slower
        than the report period, leaves reports without a result of that camera.)"""
        reasons = []
        for name in cameras:
            now = (values[f"{name} published"], values[f"{name} rejected"], values[f"{name} skipped stale"])
            published, rejected, stale = _since_last(self._previous_outcomes, name, now)
            if published > 0 or rejected + stale == 0:
                continue
            causes = []
            if rejected:
                causes.append(f"{rejected} rejected (the rejected_<reason> counters and the log say why)")
            if stale:
                causes.append(f"{stale} older than input.max_age_s (camera and node clocks in sync? use_sim_time?)")
            reasons.append(f"no result published for {name} since the last report: its frames were "
                           f"{' and '.join(causes)}")
        return "; ".join(reasons)

    def _depth_problem(self, values: dict[str, Any], cameras: Sequence[str]) -> str:
        """Why a camera got depth for none of its frames since the last report ("" when each camera
        got some, or depth is off); per camera, as :meth:`_nothing_published`."""
        reasons = []
        for name in cameras:
            if f"{name} depth paired" not in values:
                continue
            now = tuple(values[f"{name} depth {outcome}"] for outcome in ("paired", "missing", "unsynced"))
            paired, missing, unsynced = _since_last(self._previous_depth, name, now)
            if paired > 0 or missing + unsynced == 0:
                continue
            reasons.append(f"no 3D for {name}: no depth paired with the last {missing + unsynced} frame(s) ({missing} "
                           f"without a depth image or CameraInfo, {unsynced} with depth stamped more than "
                           "depth.max_dt_s apart; depth_rejected_<reason>, depth_evicted and the log say more; "
                           "see docs/ros.md)")
        return "; ".join(reasons)


def _since_last(previous: dict[str, tuple[int, ...]], name: str, now: tuple[int, ...]) -> tuple[int, ...]:
    """``now`` minus the counts ``previous`` holds for camera ``name`` (which then holds ``now``).
    A count below its previous value means the camera's counts started again (a lifecycle cleanup
    and configure makes new cameras): counted from zero, never as negative frames."""
    before = previous.get(name)
    previous[name] = now
    if before is None or any(a < b for a, b in zip(now, before)):
        return now
    return tuple(a - b for a, b in zip(now, before))


__all__ = ["HealthLevel", "report_values"]
