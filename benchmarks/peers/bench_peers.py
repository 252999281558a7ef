"""keras_softquantile against its peers on one task, at matched sharpness.

The task (defined once, in `methods.py`): for float32 scores `x` [B, n] and values `A` [B, n]
(numpy, fixed seed), build soft lower- and upper-quartile masks (k = n / 4) and the loss
`sum(high * A) - sum(low * A)`, forward and backward (gradient w.r.t. x), on the CPU.

For every method x size x sharpness level this script:
  * calibrates the method's own sharpness knob (epsilon, temperature, regularization strength,
    steepness) so that the mean absolute difference (MAD) of its upper-quartile mask from the
    hard mask hits the level (bisection/regula falsi in log space), or runs it at its library
    default (level "default");
  * times forward + backward (median of `--repeats` calls after a warm-up; `--slow-repeats`
    for calls over a second), interleaved call by call with a hard `tf.sort` of the same input
    in the same process, so the ratio to tf.sort is robust to the noise of a shared machine;
  * measures the peak resident memory of one call above the resident memory before it;
  * checks the mask sums against k, the finiteness of the gradient, and the cosine between the
    autodiff directional derivatives and central finite differences of the loss.
Each (method, size) runs in a fresh worker subprocess watched by the parent: over 8 GiB of RSS
or over 60 s for one call (or one calibration) and it is killed and the level is recorded as
skipped. The worker starts with the Keras backend its method declares (`KERAS_BACKEND`, read
once when keras is imported): keras_softquantile runs as `keras_softquantile` (TensorFlow),
`keras_softquantile[jax]` (next to OTT-JAX and SoftJAX) and `keras_softquantile[torch]` (next
to torchsort and diffsort), so one command still measures every method and writes one table.
Methods that build n x n (or k x n) matrices are skipped up front when their estimated memory
exceeds the limit.

Usage (from the repository root, with the venv of setup_env.sh):
    benchmarks/peers/.venv/bin/python benchmarks/peers/bench_peers.py
    benchmarks/peers/.venv/bin/python benchmarks/peers/bench_peers.py --quick
    benchmarks/peers/.venv/bin/python benchmarks/peers/bench_peers.py \\
        --methods keras_softquantile torchsort --sizes 1x1000 --levels 1e-2
    benchmarks/peers/.venv/bin/python benchmarks/peers/bench_peers.py --render-only
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from methods import DEFAULT_METHODS, METHODS, hard_masks  # noqa: E402

SIZES = ("1x1000", "256x1000", "1x100000", "1x1000000")
QUICK_SIZES = ("1x64", "8x64", "1x256")
LEVELS = ("1e-2", "1e-3", "default")
# One forward+backward call, or one calibration (the environment variable is for testing).
CALL_LIMIT_S = float(os.environ.get("PEERS_CALL_LIMIT_S", "60"))
LIMIT_TEXT = f">{CALL_LIMIT_S:g} s"
RSS_LIMIT = float(os.environ.get("PEERS_RSS_LIMIT_GIB", "8")) * 2**30  # per worker process
ESTIMATE_LIMIT = 6 * 2**30  # skip up front when a method's own estimate exceeds this
CALIB_ROWS = 16  # calibration and finite differences use at most this many rows
SCALE_FREE_BLOCK = 10_000  # leading block for scale-free methods whose calibration is slow
MAD_TOLERANCE = 0.02  # calibration stops within 2% of the target MAD
SLOW_CALL_S = 1.0
PREFIX = "@@ "

CSV_FIELDS = (
    "method",
    "label",
    "size",
    "batch",
    "n",
    "level",
    "status",
    "param_name",
    "param",
    "calibrated_on",
    "calib_evals",
    "calib_s",
    "mad",
    "variant",
    "time_ms",
    "time_ms_by_variant",
    "repeats",
    "sort_ms",
    "sort_variant",
    "ratio_to_sort",
    "peak_mb",
    "sum_err_low",
    "sum_err_high",
    "sum_err",
    "grad_finite",
    "grad_nonfinite",
    "cosine",
    "fd_block",
    "fd_dirs",
    "fd_h",
    "fd_gap",
    "level_s",
    "load",
    "notes",
)


def parse_size(text: str) -> tuple[int, int]:
    batch, n = text.lower().split("x")
    return int(batch), int(float(n))


def base_row(cls, batch: int, n: int) -> dict:
    """The fields every row of one method and size starts with."""
    return {
        "method": cls.name,
        "label": cls.label,
        "size": f"{batch}x{n}",
        "batch": batch,
        "n": n,
        "param_name": cls.param_name,
    }


def make_inputs(batch: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n)).astype(np.float32)
    A = rng.standard_normal((batch, n)).astype(np.float32)
    return x, A


# --------------------------------------------------------------------------------------------
# Worker side


def emit(**message) -> None:
    sys.stdout.write(PREFIX + json.dumps(message, default=float) + "\n")
    sys.stdout.flush()


def stage(name: str, level: str, limit: float) -> None:
    emit(type="stage", stage=name, level=level, limit=limit, at=time.time())


class CalibrationTimeoutError(Exception):
    pass


_LIBC = ctypes.CDLL("libc.so.6")


def _proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> int:
    """Releases what can be released, resets the RSS high-water mark; returns the RSS now."""
    gc.collect()
    time.sleep(0.2)  # let frameworks release the previous call's buffers
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _proc_status()["VmRSS"]


def peak_since(before: int) -> int:
    """Peak RSS since `reset_peak` above the RSS it returned."""
    return _proc_status()["VmHWM"] - before


def peak_call_bytes(call) -> float:
    """Peak RSS of one call above the RSS just before it (high-water mark reset first)."""
    before = reset_peak()
    call()
    return peak_since(before)


def mad_of(upper: np.ndarray, hard_upper: np.ndarray) -> float:
    if not np.all(np.isfinite(upper)):
        return math.nan
    return float(np.mean(np.abs(upper.astype(np.float64) - hard_upper)))


def calibrate(method, x_cal, target: float, level: str, budget: float, start: float):
    """Knob value whose upper-mask MAD on x_cal is within MAD_TOLERANCE of target.

    Works in s = log(temperature), where temperature is the knob or its inverse so that the
    MAD grows with s. Brackets by factors of 10 from `start`, then regula falsi (Illinois) on
    log(MAD / target). NaN counts as "too soft"; a MAD that stops falling while still above the
    target (solver not converging) is searched for its minimum before giving up; a flat MAD
    (saturated: every mask collapsed) keeps stepping.
    Returns (param, mad, evals, note); param is None when the level cannot be reached.
    """
    k = x_cal.shape[-1] // 4
    _, hard_upper = hard_masks(x_cal, k)
    t0 = time.perf_counter()
    history: list[tuple[float, float, float]] = []  # (s, mad, log(mad / target))
    sign = 1.0 if method.softer_when_larger else -1.0
    close = math.log1p(MAD_TOLERANCE)

    def param(s):
        return float(math.exp(sign * s))

    def f(s):
        if time.perf_counter() - t0 > budget:
            raise CalibrationTimeoutError
        _, upper = method.forward(x_cal, param(s), upper_only=True)
        m = mad_of(upper, hard_upper)
        fs = math.log(m / target) if math.isfinite(m) and m > 0 else math.inf
        if m == 0:  # hard: sharper than any target
            fs = -math.inf
        history.append((s, m, fs))
        emit(type="progress", level=level, what="calibrate", param=param(s), mad=m)
        return fs

    def done(s, fs, note=""):
        return param(s), target * math.exp(fs), len(history), note

    step = math.log(10.0)
    s = sign * math.log(start)
    fs = f(s)
    if abs(fs) < close:
        return done(s, fs)
    if fs > 0:  # too soft: sharpen until below the target
        hi, lo = (s, fs), None
        for _ in range(10):
            s_new = s - step
            f_new = f(s_new)
            if f_new < 0:
                lo = (s_new, f_new)
                break
            if f_new > hi[1] + 1e-6:  # rising again: look for the minimum in between
                lo, hi = _search_minimum(f, s_new, hi[0], history)
                if lo is None:
                    best = min((m for _, m, _ in history if math.isfinite(m)), default=math.nan)
                    note = f"unreachable: MAD stops falling (min {best:.3g})"
                    return None, best, len(history), note
                break
            s, hi = s_new, (s_new, f_new)
        else:
            return None, math.nan, len(history), "unreachable: no bracket"
    else:  # too sharp: soften until above the target
        lo, hi = (s, fs), None
        for _ in range(10):
            s_new = s + step
            f_new = f(s_new)
            if f_new > 0:
                hi = (s_new, f_new)
                break
            s, lo = s_new, (s_new, f_new)
        else:
            return None, math.nan, len(history), "unreachable: MAD saturates below target"
    # Illinois regula falsi on (s, log(MAD / target)); inf (NaN MAD) falls back to bisection.
    (a, fa), (b, fb) = lo, hi
    side = 0
    for _ in range(40):
        finite = math.isfinite(fa) and math.isfinite(fb)
        c = b - fb * (b - a) / (fb - fa) if finite else 0.5 * (a + b)
        if not min(a, b) < c < max(a, b):
            c = 0.5 * (a + b)
        fc = f(c)
        if abs(fc) < close:
            return done(c, fc)
        if fc < 0:
            a, fa = c, fc
            if side == -1 and math.isfinite(fb):
                fb *= 0.5
            side = -1
        else:
            b, fb = c, fc
            if side == 1 and math.isfinite(fa):
                fa *= 0.5
            side = 1
    best = min(history, key=lambda h: abs(h[2]))
    return done(best[0], best[2], "calibration stopped after 40 steps")


def _search_minimum(f, s_lo, s_hi, history):
    """Golden-section search of a non-monotone MAD on [s_lo, s_hi] for a point below target.

    Returns ((s, f) below the target, (s, f) above it on the softer side) or (None, None).
    """
    golden = (math.sqrt(5) - 1) / 2
    a, b = s_lo, s_hi
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(8):
        for s, fs in ((d, fd), (c, fc)):
            if fs < 0:
                softer = [(t, ft) for t, _, ft in history if t > s and 0 < ft < math.inf]
                if not softer:
                    continue
                return (s, fs), min(softer, key=lambda p: p[0])
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = f(d)
    return None, None


def time_calls(sort_calls: dict, steps: dict, spec: dict, level: str):
    """Interleaved timing rounds: both tf.sort variants, then every method variant, in turn.

    Runs `repeats` rounds, or stops after `slow_repeats` rounds once the method's calls have
    taken over 10 s in all. When the calls are slow (over a second), the peak memory of the
    last round's call is measured on the spot (no extra call). Returns (median ms by name,
    count by name, {variant: (peak bytes, outputs)} for the variants measured).
    """
    times: dict[str, list[float]] = {name: [] for name in (*sort_calls, *steps)}
    memory: dict[str, tuple] = {}
    spent = 0.0
    rounds = spec["repeats"]
    r = 0
    while r < rounds:
        last = r == rounds - 1 or (r + 1 >= spec["slow_repeats"] and spent > 10.0)
        for name, call in sort_calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        for name, call in steps.items():
            measure = last and min(times[name], default=0.0) > SLOW_CALL_S
            if measure:
                before = reset_peak()
            stage("repeat", level, CALL_LIMIT_S + 15)
            start = time.perf_counter()
            result = call()
            elapsed = time.perf_counter() - start
            if measure:
                memory[name] = (peak_since(before), result)
            times[name].append(elapsed)
            spent += elapsed
            if elapsed > CALL_LIMIT_S:
                raise TimeoutError(f"{name} call took {elapsed:.0f} s")
        emit(type="progress", level=level, what="repeat", round=r)
        r += 1
        if last:
            break
    medians = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return medians, {name: len(t) for name, t in times.items()}, memory


FD_LADDER = 6  # step sizes tried, each sqrt(10) smaller than the last


def finite_difference_cosine(method, x, A, param, variant, dirs, seed=1):
    """Cosine between autodiff and central finite-difference directional derivatives.

    Central differences of the loss (summed in float64 from the float32 masks) along `dirs`
    Gaussian directions, at a ladder of steps h = h0 * 10^(-j/2), j = 0..5, from
    h0 = 0.3 x (the block's upper-mask MAD) x std(x) down. The step is chosen without looking
    at the autodiff gradient: the pair of neighbouring steps whose estimates agree best (too
    large a step sees curvature, too small a one float32 noise), and the smaller of the two.
    Returns (cosine, h, self-consistency of the chosen pair, block MAD).
    """
    rng = np.random.default_rng(seed)
    _, grad, _, high = method.step_on(x, A, param, variant)
    grad = np.asarray(grad, np.float64)
    _, hard_high = hard_masks(x, x.shape[-1] // 4)
    mad = mad_of(np.asarray(high), hard_high)
    if not np.all(np.isfinite(grad)) or not math.isfinite(mad):
        return math.nan, math.nan, math.nan, mad
    A64 = A.astype(np.float64)
    x64 = x.astype(np.float64)

    def loss_at(z):
        low, high = method.forward(z.astype(np.float32), param)
        return float(np.sum(high * A64) - np.sum(low * A64))

    h0 = 0.3 * max(mad, 1e-4) * float(np.std(x64))
    steps = [h0 * 10 ** (-j / 2) for j in range(FD_LADDER)]
    directions = [rng.standard_normal(x.shape) for _ in range(dirs)]
    auto = np.array([float(np.sum(grad * d)) for d in directions])
    numeric = np.array(
        [
            [(loss_at(x64 + h * d) - loss_at(x64 - h * d)) / (2 * h) for d in directions]
            for h in steps
        ]
    )
    gaps = [
        np.linalg.norm(numeric[j] - numeric[j + 1])
        / max(np.linalg.norm(numeric[j]), np.linalg.norm(numeric[j + 1]), 1e-30)
        for j in range(FD_LADDER - 1)
    ]
    j = int(np.argmin(gaps)) + 1
    fd = numeric[j]
    cosine = float(auto @ fd / (np.linalg.norm(auto) * np.linalg.norm(fd)))
    return cosine, steps[j], float(gaps[j - 1]), mad


def run_worker(spec: dict) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    batch, n = spec["batch"], spec["n"]
    x, A = make_inputs(batch, n, spec["seed"])
    cls = METHODS[spec["method"]]
    base = base_row(cls, batch, n)
    method = cls(x, A)
    if cls.ours:  # the parent set KERAS_BACKEND; make sure keras took it
        import keras

        if keras.backend.backend() != cls.keras_backend:
            raise RuntimeError(
                f"{cls.name} needs Keras backend {cls.keras_backend!r}, "
                f"got {keras.backend.backend()!r} (KERAS_BACKEND set before keras was imported?)"
            )
    x_tf = tf.constant(x)
    sort_graph = tf.function(lambda v: tf.sort(v, axis=-1))
    sort_xla = tf.function(lambda v: tf.sort(v, axis=-1), jit_compile=True)
    sort_calls = {
        "sort_graph": lambda: sort_graph(x_tf).numpy(),
        "sort_xla": lambda: sort_xla(x_tf).numpy(),
    }
    for call in sort_calls.values():
        call()

    rows = min(batch, CALIB_ROWS)
    previous_param = None
    memo: dict = {}
    for level in spec["levels"]:
        row = dict(base, level=level)
        started = time.perf_counter()
        try:
            row.update(run_level(method, spec, level, x, A, rows, previous_param, sort_calls, memo))
        except CalibrationTimeoutError:
            row["status"] = f"skipped: {LIMIT_TEXT} (calibration)"
        except TimeoutError as error:
            row["status"] = f"skipped: {LIMIT_TEXT} ({error})"
        if row.get("param") is not None and level != "default":
            previous_param = (float(level), row["param"])
        row.setdefault("status", "ok")
        row["level_s"] = round(time.perf_counter() - started, 1)
        row["load"] = os.getloadavg()[0]
        emit(type="row", **row)


def run_level(method, spec, level, x, A, rows, previous_param, sort_calls, memo) -> dict:
    out = {}
    batch, n = x.shape
    k = n // 4
    if level == "default":
        if method.default_param is None:
            return {"status": f"n/a: no default {method.param_name}"}
        param = method.default_param
        out.update(calibrated_on="library default", calib_evals=0, calib_s=0.0)
    else:
        target = float(level)
        if previous_param is not None:  # scale the last calibrated knob as a first guess
            last_target, last_param = previous_param
            ratio = target / last_target
            start = last_param * ratio if method.softer_when_larger else last_param / ratio
        else:
            start = method.guess(target)
        x_cal = x[:rows]
        calibrated_on = f"{rows}x{n}"
        stage("calibrate", level, CALL_LIMIT_S + 30)
        t0 = time.perf_counter()
        if method.scale_free and n > SCALE_FREE_BLOCK:
            # Time one forward on the leading block and scale it to the row; if ~10 full-row
            # forwards would not fit in the budget, calibrate on the block (the knob acts on
            # quantile levels, so it carries over; the MAD column is measured on the full rows).
            block = np.ascontiguousarray(x[:rows, :SCALE_FREE_BLOCK])
            method.forward(block, start, upper_only=True)
            t1 = time.perf_counter()
            method.forward(block, start, upper_only=True)
            if (time.perf_counter() - t1) * n / SCALE_FREE_BLOCK > 3.0:
                x_cal = block
                calibrated_on = f"{rows}x{SCALE_FREE_BLOCK} (leading block)"
        budget = CALL_LIMIT_S - (time.perf_counter() - t0)
        param, calib_mad, evals, note = calibrate(method, x_cal, target, level, budget, start)
        out.update(
            calibrated_on=calibrated_on,
            calib_evals=evals,
            calib_s=round(time.perf_counter() - t0, 2),
        )
        if param is None:
            out["status"] = note
            out["mad"] = calib_mad
            return out
        if note:
            out["notes"] = note
    out["param"] = param

    # Timing, interleaved with tf.sort. One warm-up call per variant (trace / compile); for
    # calls over a second only the faster variant is kept (decided by one probe call each, or
    # at an earlier level of the same worker).
    steps = method.steps(param)
    if memo.get("variant") in steps:
        steps = {memo["variant"]: steps[memo["variant"]]}
    for variant, call in steps.items():
        stage("warm-up", level, CALL_LIMIT_S + 30)
        start = time.perf_counter()
        call()
        if time.perf_counter() - start > CALL_LIMIT_S:
            raise TimeoutError(f"{variant} warm-up took {time.perf_counter() - start:.0f} s")
    if len(steps) > 1:
        probe = {}
        for variant, call in steps.items():
            stage("warm-up", level, CALL_LIMIT_S + 15)
            start = time.perf_counter()
            call()
            probe[variant] = time.perf_counter() - start
        if min(probe.values()) > SLOW_CALL_S:
            memo["variant"] = min(probe, key=probe.get)
            steps = {memo["variant"]: steps[memo["variant"]]}
    medians, counts, memory = time_calls(sort_calls, steps, spec, level)
    by_variant = {v: medians[v] for v in steps}
    variant = min(by_variant, key=by_variant.get)
    sort_variant = min(("sort_graph", "sort_xla"), key=medians.get)
    sort_ms = medians[sort_variant]
    note = "" if "variant" not in memo else " (other variant slower, dropped)"
    out.update(
        variant=variant,
        time_ms=by_variant[variant],
        time_ms_by_variant=" / ".join(f"{v} {t:.3g}" for v, t in by_variant.items()) + note,
        repeats=counts[variant],
        sort_ms=sort_ms,
        sort_variant=sort_variant.removeprefix("sort_"),
        ratio_to_sort=by_variant[variant] / sort_ms,
    )

    # Memory of one call (the last timed one for slow calls), and its outputs for the checks.
    if variant not in memory:
        stage("memory", level, CALL_LIMIT_S + 15)
        result = {}
        peak = peak_call_bytes(lambda: result.update(out=steps[variant]()))
        memory[variant] = (peak, result["out"])
    peak, (_loss, grad, low, high) = memory[variant]
    out["peak_mb"] = peak / 2**20
    low64, high64 = np.asarray(low, np.float64), np.asarray(high, np.float64)
    _, hard_high = hard_masks(x, k)
    out["mad"] = mad_of(np.asarray(high), hard_high)
    err_low = float(np.max(np.abs(low64.sum(-1) - k)) / k)
    err_high = float(np.max(np.abs(high64.sum(-1) - k)) / k)
    out.update(sum_err_low=err_low, sum_err_high=err_high, sum_err=max(err_low, err_high))
    nonfinite = int(np.size(grad) - np.count_nonzero(np.isfinite(grad)))
    out.update(grad_finite=nonfinite == 0, grad_nonfinite=nonfinite)

    # Finite differences on at most CALIB_ROWS rows (rows are independent in every method);
    # on a leading block of the row (1e4, 1e3 or 256 entries) when full rows would take over
    # 45 s for all directions and steps: one forward is timed on each candidate block first.
    dirs = spec["fd_dirs"]
    stage("finite differences", level, 2 * CALL_LIMIT_S + 30)
    fd_n = None
    for candidate in [m for m in (n, 10_000, 1_000, 256) if m <= n]:
        forwards = 2 * dirs * FD_LADDER
        guess = out["time_ms"] / 1e3 * rows / batch * candidate / n
        if forwards * guess > 450.0:
            continue  # hopeless even if forward alone is 10x cheaper than fwd+bwd
        block = np.ascontiguousarray(x[:rows, :candidate])
        method.forward(block, param)  # compile for this shape
        start = time.perf_counter()
        method.forward(block, param)
        if forwards * (time.perf_counter() - start) <= 45.0:
            fd_n = candidate
            break
    if fd_n is None:
        out.update(cosine=math.nan, fd_block=f"skipped: {LIMIT_TEXT}")
    else:
        stage("finite differences", level, 2 * CALL_LIMIT_S)
        cosine, h, gap, fd_mad = finite_difference_cosine(
            method,
            np.ascontiguousarray(x[:rows, :fd_n]),
            np.ascontiguousarray(A[:rows, :fd_n]),
            param,
            variant,
            dirs,
        )
        block = f"{rows}x{fd_n}" + ("" if fd_n == n else f" (leading block, MAD {fd_mad:.2g})")
        out.update(cosine=cosine, fd_block=block, fd_dirs=dirs, fd_h=h, fd_gap=gap)
    return out


# --------------------------------------------------------------------------------------------
# Parent side


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_method_size(method: str, size: str, levels: list[str], args) -> list[dict]:
    """Runs one worker (respawning it for the levels left after a kill); returns its rows."""
    batch, n = parse_size(size)
    cls = METHODS[method]
    base = base_row(cls, batch, n)
    estimate = cls.estimate_bytes(batch, n)
    if estimate > ESTIMATE_LIMIT:
        status = f"skipped: OOM (estimated {estimate / 2**30:.0f} GiB)"
        rows = [dict(base, level=level, status=status) for level in levels]
        for row in rows:
            print(f"  {format_progress(row)}", flush=True)
        return rows
    rows: list[dict] = []
    remaining = list(levels)
    while remaining:
        spec = {
            "method": method,
            "batch": batch,
            "n": n,
            "levels": remaining,
            "repeats": args.repeats,
            "slow_repeats": args.slow_repeats,
            "fd_dirs": args.fd_dirs,
            "seed": args.seed,
        }
        # OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads otherwise spin on both cores after
        # each call and slow the interleaved tf.sort down (256 x 1e3: 11.4 ms alone, 16.2 ms
        # right after torchsort calls), which flattered the torch methods' ratio to the sort.
        # Passive waiting left torchsort's own time unchanged (24.2 vs 24.6 ms, measured).
        # KERAS_BACKEND: Keras reads it once, at import, so each method's worker process
        # starts with the backend the method declares (keras_softquantile[jax] and [torch]).
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="3",
            JAX_PLATFORMS="cpu",
            OMP_WAIT_POLICY="PASSIVE",
            KERAS_BACKEND=cls.keras_backend,
            **dict(cls.worker_env),
        )
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        state = {"stage": None, "level": remaining[0], "deadline": time.time() + 300}
        stderr_tail: list[str] = []

        def read_stdout(proc=proc, state=state, rows=rows):
            for line in proc.stdout:
                if not line.startswith(PREFIX):
                    continue
                msg = json.loads(line[len(PREFIX) :])
                if msg["type"] == "stage":
                    state.update(
                        stage=msg["stage"], level=msg["level"], deadline=time.time() + msg["limit"]
                    )
                elif msg["type"] == "row":
                    msg.pop("type")
                    rows.append(msg)
                    state.update(stage=None, deadline=time.time() + 300)
                    print(f"  {format_progress(msg)}", flush=True)
                elif msg["type"] == "progress" and args.verbose:
                    print(f"    {msg}", flush=True)

        def read_stderr(proc=proc, stderr_tail=stderr_tail):
            for line in proc.stderr:
                stderr_tail.append(line.rstrip())
                del stderr_tail[:-20]

        threads = [threading.Thread(target=read_stdout), threading.Thread(target=read_stderr)]
        for t in threads:
            t.start()
        killed = None
        while proc.poll() is None:
            time.sleep(0.05)
            if _rss(proc.pid) > RSS_LIMIT:
                killed = f"skipped: OOM (>{RSS_LIMIT / 2**30:g} GiB RSS)"
            elif time.time() > state["deadline"]:
                killed = f"skipped: {LIMIT_TEXT} ({state['stage'] or 'setup'})"
            if killed:
                proc.kill()
                proc.wait()
                break
        for t in threads:
            t.join()
        done = {r["level"] for r in rows}
        remaining = [level for level in remaining if level not in done]
        if remaining:
            level = state["level"] if state["level"] in remaining else remaining[0]
            if killed is None:
                last = next((s for s in reversed(stderr_tail) if s.strip()), "no output")
                killed = f"failed: {last[:160]}"
            rows.append(dict(base, level=level, status=killed))
            print(f"  {format_progress(rows[-1])}", flush=True)
            remaining.remove(level)
    return rows


def format_progress(row: dict) -> str:
    if row.get("status", "ok") != "ok":
        return f"{row['method']:>25} {row['size']:>10} {row['level']:>7}: {row['status']}"
    return (
        f"{row['method']:>25} {row['size']:>10} {row['level']:>7}: "
        f"{row['param_name']}={row['param']:.3g} mad={row['mad']:.2e} "
        f"{row['time_ms']:.3g} ms ({row['variant']}) = {row['ratio_to_sort']:.2f}x tf.sort "
        f"peak={row['peak_mb']:.1f} MB sum_err={row['sum_err']:.1e} "
        f"finite={row['grad_finite']} cos={row.get('cosine', math.nan):.4f} "
        f"[{row.get('level_s', 0):.0f} s]"
    )


def run_sort_only(size: str, args) -> dict:
    """The tf.sort floor as a row of its own (graph and XLA, forward only)."""
    code = (
        "import json, sys, time, numpy as np, tensorflow as tf\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from bench_peers import make_inputs, peak_call_bytes\n"
        f"x, _ = make_inputs({parse_size(size)[0]}, {parse_size(size)[1]}, {args.seed})\n"
        "x = tf.constant(x)\n"
        "fns = {'graph': tf.function(lambda v: tf.sort(v, axis=-1)),\n"
        "       'xla': tf.function(lambda v: tf.sort(v, axis=-1), jit_compile=True)}\n"
        "t = {k: [] for k in fns}\n"
        "for f in fns.values(): f(x).numpy(); f(x).numpy()\n"
        f"for _ in range({args.repeats}):\n"
        "    for k, f in fns.items():\n"
        "        s = time.perf_counter(); f(x).numpy(); t[k].append(time.perf_counter() - s)\n"
        "m = {k: 1e3 * float(np.median(v)) for k, v in t.items()}\n"
        "best = min(m, key=m.get)\n"
        "peak = peak_call_bytes(lambda: fns[best](x).numpy()) / 2**20\n"
        "print(json.dumps({'m': m, 'best': best, 'peak': peak}))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    batch, n = parse_size(size)
    return {
        "method": "tf.sort",
        "label": "hard tf.sort (forward only)",
        "size": f"{batch}x{n}",
        "batch": batch,
        "n": n,
        "level": "hard",
        "status": "ok",
        "variant": res["best"],
        "time_ms": res["m"][res["best"]],
        "time_ms_by_variant": " / ".join(f"{k} {v:.3g}" for k, v in res["m"].items()),
        "repeats": args.repeats,
        "sort_ms": res["m"][res["best"]],
        "sort_variant": res["best"],
        "ratio_to_sort": 1.0,
        "peak_mb": res["peak"],
        "mad": 0.0,
        "sum_err": 0.0,
    }


# --------------------------------------------------------------------------------------------
# Output


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Old rows with the new run's (method, size, level) rows in their place (tf.sort kept)."""
    new = [r for r in new if r["method"] != "tf.sort"]
    fresh = {(r["method"], r["size"], r["level"]): r for r in new}
    merged = [fresh.pop((r["method"], r["size"], r["level"]), r) for r in old]
    return merged + list(fresh.values())


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_csv(path: Path) -> list[dict]:
    numeric = {
        "batch",
        "n",
        "param",
        "calib_evals",
        "calib_s",
        "mad",
        "time_ms",
        "repeats",
        "sort_ms",
        "ratio_to_sort",
        "peak_mb",
        "sum_err_low",
        "sum_err_high",
        "sum_err",
        "grad_nonfinite",
        "cosine",
        "fd_dirs",
        "fd_h",
        "fd_gap",
        "level_s",
        "load",
    }
    rows = []
    with path.open() as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if value == "":
                    continue
                if key in numeric:
                    row[key] = float(value)
                elif key == "grad_finite":
                    row[key] = value == "True"
                else:
                    row[key] = value
            rows.append(row)
    return rows


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def machine_info(methods: list[str]) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    packages = [
        "tensorflow",
        "keras",
        "tensorflow-probability",
        "keras_softquantile",
        "numpy",
        "jax",
        "jaxlib",
        "ott-jax",
        "softjax",
        "equinox",
        "torch",
        "torchsort",
        "diffsort",
        "matplotlib",
    ]
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return [
        f"- Date: {datetime.date.today().isoformat()}",
        f"- CPU: {cpu}, {os.cpu_count()} cores visible; {_memory_gib():.0f} GiB RAM; "
        f"{platform.system()} {platform.release()}; shared with other work (noisy)",
        f"- Python {platform.python_version()}; " + ", ".join(versions),
        "- float32, CPU only, library default thread pools",
    ]


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except OSError:
        return math.nan


def render_markdown(rows: list[dict], path: Path, meta: dict) -> None:
    lines = [
        "# keras_softquantile against its peers, at matched sharpness",
        "",
        "Task: soft lower- and upper-quartile masks (k = n/4) of float32 scores x [B, n], loss "
        "`sum(high * A) - sum(low * A)`, forward + backward w.r.t. x, CPU. Each method's knob is "
        "calibrated so that the mean absolute difference (MAD) of its upper mask from the hard "
        "mask is the level (column `MAD` gives what was reached at the measured size); level "
        "`default` runs the library default. Produced by `benchmarks/peers/bench_peers.py` "
        "(method details in `benchmarks/peers/README.md`).",
        "",
        "Time: median fwd+bwd ms; `x sort`: ratio to the faster of graph/XLA hard `tf.sort` "
        "(forward only) timed interleaved in the same process. Peak: resident memory of one "
        "call above the resident memory before it (MB). Sum err: max over rows and both masks "
        "of |sum(mask) - k| / k. Finite: gradient has no NaN/inf. Cos: cosine between autodiff "
        "and central finite-difference directional derivatives.",
        "",
        "## Machine",
        "",
        *meta["machine"],
        f"- Run: {meta.get('command', '')}; total wall time {meta.get('wall', '?')}",
        "",
    ]
    sort_rows = {r["size"]: r for r in rows if r["method"] == "tf.sort"}
    if sort_rows:
        lines += [
            "## Floor: hard tf.sort (forward only, own process)",
            "",
            "| B x n | graph / XLA (ms) | peak MiB |",
            "|---|---|---|",
        ]
        for size, r in sort_rows.items():
            lines.append(
                f"| {size} | {r.get('time_ms_by_variant', '-')} | {_fmt(r.get('peak_mb'), '.1f')} |"
            )
        lines.append("")
    levels = []
    for r in rows:
        if r["method"] != "tf.sort" and r["level"] not in levels:
            levels.append(r["level"])
    for level in levels:
        title = "library default knob" if level == "default" else f"matched MAD = {level}"
        lines += [
            f"## {title}",
            "",
            "| B x n | method | knob | MAD | time ms | x sort | peak MiB | sum err | finite | cos "
            "| status / notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["level"] != level or r["method"] == "tf.sort":
                continue
            knob = "-"
            if "param" in r:
                knob = f"{r['param_name']}={r['param']:.3g}"
            timing = "-"
            if "time_ms" in r:
                timing = f"{r['time_ms']:.3g} ({r['variant']})"
            finite = "-" if "grad_finite" not in r else ("yes" if r["grad_finite"] else "**no**")
            notes = r.get("status", "")
            extra = [r.get(k) for k in ("notes",) if r.get(k) and r.get(k) != "ok"]
            if r.get("calibrated_on") not in (None, r["size"], "library default"):
                extra.append(f"calibrated on {r['calibrated_on']}")
            fd_skipped = str(r.get("fd_block", "")).startswith("skipped")
            if fd_skipped:
                extra.append(f"FD {r['fd_block']}")
            elif r.get("fd_block") and r.get("fd_block") != r["size"]:
                extra.append(f"FD on {r['fd_block']}")
            if r.get("fd_gap", 0) > 0.05:
                extra.append(f"FD not converged (gap {r['fd_gap']:.2g})")
            if (
                r.get("grad_finite")
                and not fd_skipped
                and "cosine" in r
                and math.isnan(r["cosine"])
            ):
                extra.append("cos undefined (zero gradient or FD)")
            if extra:
                notes = "; ".join([notes, *extra])
            lines.append(
                f"| {r['size']} | {r['method']} | {knob} | {_fmt(r.get('mad'), '.2e')} "
                f"| {timing} | {_fmt(r.get('ratio_to_sort'), '.2f')} "
                f"| {_fmt(r.get('peak_mb'), '.1f')} | {_fmt(r.get('sum_err'), '.1e')} "
                f"| {finite} | {_fmt(r.get('cosine'), '.4f')} | {notes} |"
            )
        lines.append("")
    lines += ["## Targets of the issue", "", *targets_summary(rows), ""]
    path.write_text("\n".join(lines))


def _is_ours(method: str) -> bool:
    cls = METHODS.get(method)
    return cls is not None and cls.ours


def _framework(method: str) -> str:
    cls = METHODS.get(method)
    return cls.framework if cls is not None else ""


def targets_summary(rows: list[dict]) -> list[str]:
    """Checks the issue's targets on the rows, at each matched level.

    Each of our rows is compared with the fastest peer of all and, for the JAX and PyTorch
    backends, with the fastest peer in its own framework (OTT-JAX / SoftJAX, torchsort /
    diffsort), all through the ratio to the tf.sort timed in the same process.
    """
    out = []
    ours = [r for r in rows if _is_ours(r["method"]) and r["level"] != "default"]
    peers = [
        r
        for r in rows
        if not _is_ours(r["method"]) and r["method"] != "tf.sort" and r["level"] != "default"
    ]
    for r in ours:
        name = r["method"]
        if r.get("status") != "ok":
            out.append(f"- {r['size']} MAD {r['level']}: {name} {r['status']}")
            continue
        same = [
            p
            for p in peers
            if p["size"] == r["size"] and p["level"] == r["level"] and p.get("status") == "ok"
        ]
        parts = [f"- {r['size']} MAD {r['level']}: {name} {r['ratio_to_sort']:.2f}x tf.sort"]
        scopes = [("fastest peer", same)]
        if _framework(name) != "tf":
            own = [p for p in same if _framework(p["method"]) == _framework(name)]
            scopes.append((f"fastest {_framework(name)} peer", own))
        for what, pool in scopes:
            fastest = min(pool, key=lambda p: p["ratio_to_sort"], default=None)
            if fastest is not None:
                verdict = "met" if r["ratio_to_sort"] <= fastest["ratio_to_sort"] else "MISSED"
                parts.append(
                    f"{what} {fastest['method']} {fastest['ratio_to_sort']:.2f}x "
                    f"(as fast as it: {verdict}, "
                    f"{fastest['ratio_to_sort'] / r['ratio_to_sort']:.2f}x)"
                )
        if r["size"] in ("256x1000", "1x1000000"):
            for p in same:
                if METHODS[p["method"]].sorts_or_matrix:
                    speedup = p["ratio_to_sort"] / r["ratio_to_sort"]
                    verdict = "met" if speedup >= 3 else "MISSED"
                    parts.append(f">=3x vs {p['method']}: {speedup:.1f}x {verdict}")
        out.append("; ".join(parts))
    for name in [m for m in METHODS if METHODS[m].ours]:
        ours_all = [r for r in rows if r["method"] == name and r.get("status") == "ok"]
        if not ours_all:
            continue
        nonfinite = sum(int(r.get("grad_nonfinite", 0)) for r in ours_all)
        worst = max((r.get("sum_err", math.nan) for r in ours_all), default=math.nan)
        out.append(
            f"- {name} non-finite gradient entries over all rows: {nonfinite} "
            f"(target 0: {'met' if nonfinite == 0 else 'MISSED'})"
        )
        out.append(
            f"- {name} worst mask-sum relative error: {worst:.1e} "
            f"(target 1e-4: {'met' if worst <= 1e-4 else 'MISSED'})"
        )
    return out


def render_plots(rows: list[dict], plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plot_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    palette = plt.cm.tab10.colors if len(METHODS) <= 10 else plt.cm.tab20.colors
    colors = dict(zip(METHODS, palette, strict=False))
    sort_rows = {r["size"]: r for r in rows if r["method"] == "tf.sort"}
    paths = []
    for level in ("1e-2", "1e-3"):
        level_rows = [r for r in rows if r["level"] == level and r.get("status") == "ok"]
        if not level_rows:
            continue
        fig, (ax, bx) = plt.subplots(
            1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [2.2, 1]}
        )
        for m in methods:
            mine = [r for r in level_rows if r["method"] == m and r["batch"] == 1]
            pts = sorted((r["n"], r["time_ms"]) for r in mine)
            if pts:
                # Hollow markers: the gradient had NaN/inf entries.
                bad = any(not r.get("grad_finite", True) for r in mine)
                ax.plot(
                    *zip(*pts, strict=True),
                    "o-",
                    color=colors[m],
                    mfc="white" if bad else colors[m],
                    label=m + (" (NaN gradient)" if bad else ""),
                )
        floor = sorted((r["n"], r["time_ms"]) for r in sort_rows.values() if r["batch"] == 1)
        if floor:
            ax.plot(*zip(*floor, strict=True), "k--", label="hard tf.sort (fwd only)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (B = 1)")
        ax.set_ylabel("forward + backward, median ms")
        ax.set_title(f"Quartile split at matched MAD = {level}, float32 CPU")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        batch_rows = [r for r in level_rows if r["size"] == "256x1000"]
        if not batch_rows:  # a run without 256 x 1000: no bar panel
            bx.set_visible(False)
        else:
            names = [m for m in methods if any(r["method"] == m for r in batch_rows)]
            values = [next(r["time_ms"] for r in batch_rows if r["method"] == m) for m in names]
            bx.barh(names, values, color=[colors[m] for m in names])
            for i, m in enumerate(names):
                ratio = next(r["ratio_to_sort"] for r in batch_rows if r["method"] == m)
                bx.text(values[i], i, f" {ratio:.3g}x", va="center", fontsize=8)
            if "256x1000" in sort_rows:
                bx.axvline(sort_rows["256x1000"]["time_ms"], color="k", ls="--", label="tf.sort")
                bx.legend(fontsize=8)
            bx.set_xscale("log")
            low = min([*values, sort_rows.get("256x1000", {}).get("time_ms", math.inf)])
            bx.set_xlim(low / 3, max(values, default=low) * 20)
            bx.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            bx.set_xlabel("ms, B x n = 256 x 1000 (label: x tf.sort)")
            bx.invert_yaxis()
            bx.grid(True, axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        path = plot_dir / f"peers_time_mad{level}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=None, help="B x n, e.g. 256x1000")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), help="MAD or 'default'")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--repeats", type=int, default=11, help="timed calls under 1 s")
    parser.add_argument("--slow-repeats", type=int, default=5, help="timed calls over 1 s")
    parser.add_argument("--fd-dirs", type=int, default=8, help="finite-difference directions")
    parser.add_argument(
        "--default-max-n",
        type=float,
        default=1e5,
        help="run level 'default' only for n up to this (it is slow for OTT at n = 1e6)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--plot-dir", type=Path, default=REPO / "docs" / "assets" / "benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke run")
    parser.add_argument("--render-only", action="store_true", help="re-render md/plots from CSV")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the measured (method, size, level) rows of the existing CSV",
    )
    parser.add_argument("--run-note", help="text for the markdown's run line (instead of argv)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    if args.quick:
        args.repeats = min(args.repeats, 5)
        args.fd_dirs = min(args.fd_dirs, 8)
    csv_path = args.output_dir / "peers.csv"
    md_path = args.output_dir / "peers.md"
    meta = {"machine": machine_info(args.methods)}
    if args.render_only:
        rows = read_csv(csv_path)
        meta.update(command="(re-rendered from peers.csv)", wall="see the run that made the CSV")
    else:
        start = time.time()
        rows = []
        # With --merge, the CSV on disk keeps its other rows through every intermediate save.
        old_rows = read_csv(csv_path) if args.merge and csv_path.exists() else None

        def save():
            write_csv(rows if old_rows is None else merge_rows(old_rows, rows), csv_path)

        for size in sizes:
            print(f"== {size}", flush=True)
            sort_row = run_sort_only(size, args)
            rows.append(sort_row)
            print(f"  tf.sort {size}: {sort_row['time_ms_by_variant']} ms", flush=True)
            levels = [
                level
                for level in args.levels
                if level != "default" or parse_size(size)[1] <= args.default_max_n
            ]
            for method in args.methods:
                rows.extend(run_method_size(method, size, levels, args))
                save()  # keep what was measured if the run is cut short
        wall = time.time() - start
        meta.update(
            command="`" + " ".join(["python benchmarks/peers/bench_peers.py", *sys.argv[1:]]) + "`",
            wall=f"{wall / 60:.1f} min",
        )
        print(f"total wall time {wall / 60:.1f} min")
        if old_rows is not None:
            rows = merge_rows(old_rows, rows)
    if args.run_note:
        meta.update(command=args.run_note, wall="see the run note")
    write_csv(rows, csv_path)
    render_markdown(rows, md_path, meta)
    for path in render_plots(rows, args.plot_dir):
        print(f"wrote {path}")
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
