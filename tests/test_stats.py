"""Seed statistics of the reproduced tables against scipy and by simulation."""

import random

import pytest

from vbdropout.experiments import TABLES
from vbdropout.experiments.reproduce import table_markdown
from vbdropout.experiments.stats import mean_interval, t_quantile_975, welch_interval

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [0.5, 1, 1.2, 1.5, 2, 2.7, 3, 4, 5.5, 9, 17.3, 30, 120, 1e4])
def test_t_quantiles_match_scipy(df):
    assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-8)


def test_t_quantile_refuses_a_non_positive_df():
    for df in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            t_quantile_975(df)


def test_mean_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random(0)
    trials = 4000
    hits = sum(
        bool(mean_interval([rng.gauss(1.5, 0.3) for _ in range(4)]).contains(1.5))
        for _ in range(trials)
    )
    assert abs(hits / trials - 0.95) < 3 * (0.95 * 0.05 / trials) ** 0.5
    assert mean_interval([1.0]).contains(1.0) is None


def test_welch_interval_matches_scipy():
    rng = random.Random(1)
    for _ in range(20):
        a = [rng.gauss(1.4, 0.2) for _ in range(rng.randint(2, 6))]
        b = [rng.gauss(1.6, 0.5) for _ in range(rng.randint(2, 6))]
        ours = welch_interval(a, b)
        ref = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        assert ours.estimate == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
        assert ours.low == pytest.approx(ref.low, rel=1e-7, abs=1e-9)
        assert ours.high == pytest.approx(ref.high, rel=1e-7, abs=1e-9)
    assert welch_interval([1.0], [2.0, 3.0]).low is None


def _cell(label, model, seed, error, neurons):
    compression = {"compression_ratio": 2.0, "sparsity_per_layer": "50.0-50.0"}
    return {"label": label, "model": model, "column": model, "seed": seed, "epochs": 200,
            "test_error": error / 100, "neurons_per_layer": neurons,
            "compression": compression}  # fmt: skip


def test_table_markdown_shows_spread_interval_and_welch_comparison():
    cells = [
        _cell("Ours", "lenet500_300", s, e, [180 + s, 160, 60, 10])
        for s, e in enumerate([1.30, 1.36, 1.40])
    ] + [
        _cell("SBP", "lenet500_300", s, e, [240, 160 + 2 * s, 55, 10])
        for s, e in enumerate([1.50, 1.58, 1.55])
    ] + [_cell("Original", "lenet500_300", 0, 1.5, [784, 500, 300, 10])]  # fmt: skip
    text = table_markdown(TABLES["table5"], "paper", cells, [])
    ours = next(line for line in text.splitlines() if line.startswith("| Ours |"))
    # mean ± sd 1.35 ± 0.05 contains the paper's 1.35; neurons are per-layer means (± sd)
    assert "| 1.35 | 1.35 ± 0.05 | yes | 179-160-60-10 | 181-160-60-10 (± 1-0-0-0) |" in ours
    sbp = next(line for line in text.splitlines() if line.startswith("| SBP |"))
    assert "| 1.55 | 1.54 ± 0.04 | yes |" in sbp
    original = next(line for line in text.splitlines() if line.startswith("| Original |"))
    assert "| 1.54 | 1.50 | – |" in original, "one seed: no interval"
    d = welch_interval([1.30, 1.36, 1.40], [1.50, 1.58, 1.55])
    line = next(line for line in text.splitlines() if line.startswith("- Ours − SBP"))
    assert f"error {d.estimate:+.2f} [{d.low:+.2f}, {d.high:+.2f}] points" in line
    assert "units kept" in line and "n = 3 vs 3" in line
    assert "Ours − Original" not in text, "one seed of Original: no comparison"
