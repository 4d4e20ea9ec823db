"""Model output → the solver's prediction, as a linear map of (x, model output).

With x_t = α x₀ + σ ε (flow: α = 1 − s, σ = s, velocity v = ε − x₀):

* x̂₀:  epsilon (x − σ ε̂)/α · sample  out · v_prediction  α x − σ v̂ · flow_prediction  x − s v̂
* ε̂:   ε̂ = (x − α x̂₀)/σ  (epsilon: the output itself; v: α v̂ + σ x)

Every map is D = c_x·x + c_o·out, so it folds into the plan's coefficient table.
"""

from __future__ import annotations

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def x0_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(c_x, c_o) with x̂₀ = c_x·x + c_o·out."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "flow_prediction":
        return 1.0, -sigma
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def output_from_x0(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(a, b) with out = a·x + b·x̂₀: the model output that ``prediction_type`` would give for the data prediction
    x̂₀ (inverts ``x0_coefficients``; c_o ≠ 0 wherever σ > 0)."""
    cx, co = x0_coefficients(prediction_type, alpha, sigma)
    return -cx / co, 1.0 / co


def eps_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(c_x, c_o) with ε̂ = c_x·x + c_o·out."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sigma, alpha
    cx, co = x0_coefficients(prediction_type, alpha, sigma)
    return (1.0 - alpha * cx) / sigma, -alpha * co / sigma


def prediction_coefficients(prediction_type: str, data_form: bool, alpha: float, sigma: float) -> tuple[float, float]:
    """The solver's D = c_x·x + c_o·out: x̂₀ for data-form solvers, ε̂ for noise-form ones."""
    if data_form:
        return x0_coefficients(prediction_type, alpha, sigma)
    return eps_coefficients(prediction_type, alpha, sigma)
