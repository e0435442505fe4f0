"""Seed statistics of the reproduced tables against scipy and by simulation."""

import math
import random
import re

import pytest

from vbdropout.experiments import TABLES
from vbdropout.experiments.reproduce import table_markdown
from vbdropout.experiments.stats import (
    mean_interval,
    prediction_interval,
    t_quantile_975,
    welch_interval,
)


@pytest.fixture
def scipy_stats():
    return pytest.importorskip("scipy.stats")


@pytest.mark.parametrize(
    "df",
    [
        0.05,
        0.2,
        0.5,
        1,
        1.2,
        1.5,
        2,
        2.7,
        3,
        4,
        5.5,
        9,
        17.3,
        30,
        120,
        1e4,
        9.9e4,
        1.01e5,
        1e6,
        1e7,
        1e9,
        1e15,
    ],
)
def test_t_quantiles_match_scipy(df, scipy_stats):
    assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-8)


def test_t_quantiles_match_the_printed_table_and_the_normal_limit():
    printed = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042}
    assert {df: round(t_quantile_975(df), 3) for df in printed} == printed
    for df in (1e8, 1e15, math.inf):
        assert t_quantile_975(df) == pytest.approx(1.959963984540054, rel=1e-7)


def test_t_quantile_refuses_a_df_it_cannot_compute():
    for df in (0.01, 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="degrees of freedom must be at least 0.05"):
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


def test_prediction_interval_covers_one_more_run_95_percent_of_the_time():
    """A further draw of the same distribution falls in the interval 95% of the time,
    where the interval of the mean holds it far less often (the paper's single runs)."""
    rng = random.Random(2)
    trials, predicted, of_mean = 4000, 0, 0
    for _ in range(trials):
        runs = [rng.gauss(1.5, 0.3) for _ in range(3)]
        another = rng.gauss(1.5, 0.3)
        predicted += bool(prediction_interval(runs).contains(another))
        of_mean += bool(mean_interval(runs).contains(another))
    assert abs(predicted / trials - 0.95) < 3 * (0.95 * 0.05 / trials) ** 0.5
    assert of_mean / trials < 0.87  # 0.836 in theory for n = 3


def test_prediction_interval_by_hand():
    # m = 2, s = 1, n = 3: 2 ± t(0.975, 2)·√(4/3)
    interval = prediction_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * math.sqrt(4 / 3)
    assert (interval.low, interval.high) == pytest.approx((2 - half, 2 + half), rel=1e-9)
    assert prediction_interval([1.0]).contains(1.0) is None


def test_intervals_of_values_that_are_not_finite_or_all_equal():
    for bad in ([1.3, math.nan, 1.4], [1.3, math.inf]):
        assert mean_interval(bad).low is None and prediction_interval(bad).low is None
        assert welch_interval(bad, [1.5, 1.6]).low is None
        assert welch_interval([1.5, 1.6], bad).low is None
    # equal values: a point, which holds the value they were rounded from
    assert prediction_interval([100 * 0.0007] * 3).contains(0.07) is True
    assert welch_interval([1.0, 1.0], [2.0, 2.0]).contains(-1.0) is True


def test_welch_interval_matches_scipy(scipy_stats):
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


def _cell(label, model, seed, error, neurons, ratio=2.0, sparsity=(50.0, 50.0)):
    compression = {
        "compression_ratio": ratio,
        "layers": [{"sparsity": v} for v in sparsity],
        "sparsity_per_layer": "-".join(f"{v:.1f}" for v in sparsity),
    }
    return {"label": label, "model": model, "column": model, "seed": seed, "epochs": 200,
            "test_error": error / 100, "neurons_per_layer": neurons,
            "compression": compression}  # fmt: skip


def _table_rows(text):
    """The cells of every markdown table row, split at the unescaped pipes."""
    return [
        re.split(r"(?<!\\)\|", line.strip())[1:-1]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def test_compression_table_is_well_formed_with_sparsity_spread_and_ratios():
    """Table 4's |W|/|W≠0| columns do not split the markdown rows; sparsity per layer is
    the mean (± sd) of the exact values (74.04 and 74.14: 74.1, where the rounded 74.0
    and 74.1 would give 74.0); an inf ratio stays inf."""
    cells = [
        _cell("VD", "lenet300_100", s, e, [], ratio=r, sparsity=sp)
        for s, (e, r, sp) in enumerate(
            [(1.71, 53.0, (98.44, 97.0, 74.04)), (1.81, 54.0, (98.44, 97.2, 74.14))]
        )
    ] + [
        _cell("Ours (low test error)", "lenet300_100", s, e, [], ratio=None)
        for s, e in enumerate([1.6, 1.7])
    ]  # fmt: skip
    text = table_markdown(TABLES["table4"], "paper", cells, [])
    rows = _table_rows(text)
    assert len(rows) == 4 and {len(r) for r in rows} == {len(rows[1])}, rows
    assert "paper \\|W\\|/\\|W≠0\\|" in text
    vd = next(r for r in rows if r[0].strip() == "VD")
    assert [c.strip() for c in vd[5:9]] == [
        "98.9-97.2-62.0", "98.4-97.1-74.1 (± 0.0-0.1-0.1)", "68", "53.5 ± 0.7"
    ]  # fmt: skip
    ours = next(r for r in rows if r[0].startswith(" Ours"))
    assert ours[8].strip() == "inf" and ours[4].strip() == "yes"


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
