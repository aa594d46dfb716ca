"""The error band on a prediction: the one definition of its width, its formatting and of ties.

A profile calibrated against measured runs carries `uncertainty` (perfmodel.specs.UncertaintySpec):
the RMS of out-of-sample log residuals ln(predicted / measured tokens/s) over `n_runs` runs and the
two-sided `confidence` the band is meant to have. With w = z((1 + confidence) / 2) x loo_log_rms
the band of a prediction P is P x exp(-w) .. P x exp(+w): symmetric in log space, since the
residuals are ratios. Tables print its upper half-width, 100 x (exp(w) - 1) %, as `1.78 M ± 6 %`.

Ties: a plan is as good as the winner when its prediction lies inside the winner's band, i.e. its
tokens/s >= winner x exp(-w) (not exp(-2w), "two independent bands overlap"): plans of one search
share the profile's constants and the cluster, so their errors are positively correlated and the
log-ratio of two predictions spreads less than one prediction's error does (sqrt(2(1 - rho)) sigma,
at most sigma for rho >= 1/2); 2w would assume independent errors and call too many plans equal.

A profile without `uncertainty` (presets not yet calibrated, CPU, an inline profile) gives no band:
`band` returns (None, None), `fmt_tokens` the plain figure, and reports say NO_BAND.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any, TypeVar

from perfmodel.specs import UncertaintySpec

NO_BAND = "no error band: profile not calibrated against measured runs"
DEFAULT_CONFIDENCE = 0.9  # the level `moeperf compare` (and the calibration) state their bands at
TIE_WIDTHS = 1.0  # a tie lies within TIE_WIDTHS x w of the winner in log space (see above)

T = TypeVar("T")


def z_for(confidence: float) -> float:
    """The standard normal quantile a two-sided band of `confidence` needs (0.9 -> 1.6449)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf((1.0 + confidence) / 2.0)


def log_halfwidth(unc: UncertaintySpec) -> float:
    """w: the band's half-width in log space (z x loo_log_rms; the YAML's log_halfwidth echoes it)."""
    return z_for(unc.confidence) * unc.loo_log_rms


def band(tokens_per_s: float, unc: UncertaintySpec | None) -> tuple[float | None, float | None]:
    """(low, high) tokens/s of a prediction, or (None, None) without a calibrated band."""
    if unc is None:
        return None, None
    w = log_halfwidth(unc)
    return tokens_per_s * math.exp(-w), tokens_per_s * math.exp(w)


def band_fields(tokens_per_s: float | None, unc: UncertaintySpec | None) -> dict[str, float | None]:
    """The JSON/CSV fields `tokens_per_s_low`, `tokens_per_s_high` (None: no band or no prediction)."""
    low, high = band(tokens_per_s, unc) if tokens_per_s is not None else (None, None)
    return {"tokens_per_s_low": low, "tokens_per_s_high": high}


def halfwidth_pct(unc: UncertaintySpec) -> float:
    """The band's upper half-width in percent of the prediction: 100 x (exp(w) - 1)."""
    return 100.0 * math.expm1(log_halfwidth(unc))


def fmt_pct(unc: UncertaintySpec) -> str:
    """The half-width as printed: `6 %` (one decimal under 1 %)."""
    pct = halfwidth_pct(unc)
    return f"{pct:.0f} %" if pct >= 1 else f"{pct:.1f} %"


def fmt_conf(unc: UncertaintySpec) -> str:
    return f"{100 * unc.confidence:g} %"


def _three_digits(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def fmt_plain(x: float) -> str:
    """Tokens/s for people, 3 significant digits: 1.78 M, 56.0 k, 950."""
    if x >= 1e6:
        return f"{_three_digits(x / 1e6)} M"
    if x >= 1e3:
        return f"{_three_digits(x / 1e3)} k"
    return _three_digits(x)


def fmt_tokens(tokens_per_s: float, unc: UncertaintySpec | None = None) -> str:
    """`1.78 M ± 6 %` with a band, `1.78 M` without."""
    return fmt_plain(tokens_per_s) + (f" ± {fmt_pct(unc)}" if unc is not None else "")


def describe(unc: UncertaintySpec | None) -> str:
    """One sentence on where the band comes from (or NO_BAND)."""
    if unc is None:
        return NO_BAND
    how = f": {unc.method}" if unc.method else ""
    return (f"error band ±{fmt_pct(unc)} at {fmt_conf(unc)} confidence (RMS log residual "
            f"{unc.loo_log_rms:.3f} over {unc.n_runs} runs{how})")


def tie_set(ranked: Sequence[T], unc: UncertaintySpec | None,
            tokens: Callable[[T], float] = lambda r: float(r.tokens_per_s)) -> list[T]:  # type: ignore[attr-defined]
    """The plans (best first) whose prediction lies within the model's error of the winner's:
    tokens/s >= winner x exp(-TIE_WIDTHS x w). The winner alone without a band; [] for no plans."""
    if not ranked:
        return []
    if unc is None:
        return [ranked[0]]
    floor = tokens(ranked[0]) * math.exp(-TIE_WIDTHS * log_halfwidth(unc))
    return [r for r in ranked if tokens(r) >= floor]


def from_residuals(log_residuals: Sequence[float], method: str,
                   confidence: float = DEFAULT_CONFIDENCE) -> UncertaintySpec | None:
    """The `uncertainty` block of out-of-sample log residuals ln(predicted / measured); None for
    fewer than 2 (one residual says nothing about the spread)."""
    res = [float(r) for r in log_residuals if math.isfinite(r)]
    if len(res) < 2:
        return None
    rms = math.sqrt(sum(r * r for r in res) / len(res))
    return UncertaintySpec(confidence=confidence, loo_log_rms=_sig(rms), n_runs=len(res), method=method,
                           log_halfwidth=_sig(z_for(confidence) * _sig(rms)))


def block(unc: UncertaintySpec | None) -> dict[str, Any] | None:
    """The band for JSON summaries: the profile's block plus the derived half-widths."""
    if unc is None:
        return None
    return {**unc.model_dump(mode="json", exclude_none=True), "log_halfwidth": log_halfwidth(unc),
            "halfwidth_pct": halfwidth_pct(unc)}


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")
