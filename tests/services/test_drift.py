"""deepserve.drift: PSI, KS, the training reference, the drift monitor and the shadow comparators."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepserve import drift
from deepserve.drift import (AgreementShadow, DriftMonitor, OverlapShadow, Reference, ScoreShadow, Window, ks,
                             psi)


def normal(seed: int, n: int, loc: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, 1.0, n)


# ---------------------------------------------------------------------------- psi and ks


def test_psi_of_identical_distributions_is_zero_and_of_a_shift_large():
    assert psi([0.25, 0.25, 0.5], [25, 25, 50]) == 0.0  # counts or fractions alike
    # One bin's share moved: 0.5 -> 0.3 and 0.2 -> 0.4; by hand, sum (o - e) ln(o / e).
    want = (0.3 - 0.5) * np.log(0.3 / 0.5) + (0.4 - 0.2) * np.log(0.4 / 0.2)
    assert psi([0.5, 0.2, 0.3], [0.3, 0.4, 0.3]) == pytest.approx(want)


def test_psi_floors_an_empty_bin_instead_of_giving_inf():
    value = psi([0.5, 0.5], [1.0, 0.0])
    assert np.isfinite(value) and value > 2  # (0.5 - 1e-4) * ln(0.5 / 1e-4) dominates
    assert value == pytest.approx(0.5 * np.log(2) + (1e-4 - 0.5) * np.log(1e-4 / 0.5))


def test_psi_refuses_mismatched_bins():
    with pytest.raises(ValueError, match="same bins"):
        psi([0.5, 0.5], [1, 2, 3])


def test_ks_exact_on_hand_made_samples():
    assert ks([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks([1, 2, 3], [4, 5, 6]) == 1.0
    # CDFs at 2: a 2/4, b 0/2 -> the largest gap, 0.5.
    assert ks([1, 2, 3, 4], [2.5, 3.5]) == 0.5


def test_ks_and_psi_near_zero_for_samples_of_one_distribution_and_large_for_a_shift():
    reference = Reference.fit(normal(0, 5000), "score")
    same, shifted = normal(1, 5000), normal(2, 5000, loc=1.0)
    assert psi(reference.fractions, reference.counts(same)) < 0.02
    assert psi(reference.fractions, reference.counts(shifted)) > 0.2
    assert ks(normal(0, 5000), same) < 0.05
    assert ks(normal(0, 5000), shifted) > 0.3  # the true gap is 2 * Phi(0.5) - 1 = 0.38


# ---------------------------------------------------------------------------- reference


def test_reference_fit_makes_equal_frequency_bins():
    values = np.arange(1000, dtype=np.float64)
    reference = Reference.fit(values, "score", bins=4)
    assert reference.edges == (249.5, 499.5, 749.5)  # halfway between the 250th and 251st value, ...
    assert reference.fractions == (0.25, 0.25, 0.25, 0.25)
    assert reference.rows == 1000
    assert Reference.fit(values[::-1], "score", bins=4) == reference  # deterministic, order-free


def test_reference_fit_merges_tied_edges_and_measures_the_shares():
    # A confident classifier: 70% of confidences exactly 1.0.
    values = np.concatenate([np.linspace(0.5, 0.99, 300), np.ones(700)]).astype(np.float32)
    reference = Reference.fit(values, "confidence", bins=10)
    assert reference.edges[-1] == 0.99999 and len(set(reference.edges)) == len(reference.edges)
    assert reference.fractions[-1] == pytest.approx(0.7)  # the bin [0.99999, inf)
    assert sum(reference.fractions) == pytest.approx(1.0)
    assert reference.counts(values).tolist() == [round(f * 1000) for f in reference.fractions]


def test_confidence_edges_ignore_float32_rounding_near_one():
    # Half the held-out images at 1 - 1e-7 .. 1.0 (float32 steps): the providers may round them
    # either way, so they share one bin whatever the rounding.
    top = np.float32(1.0) - np.arange(4, dtype=np.float32) * np.finfo(np.float32).epsneg  # 1.0, 0.99999994, ...
    values = np.concatenate([np.linspace(0.9, 0.9999, 500), np.resize(top, 500)]).astype(np.float32)
    reference = Reference.fit(values, "confidence")
    assert all(round(e, 5) == e for e in reference.edges) and reference.edges[-1] == 0.99999
    assert len(set(reference.counts(top).nonzero()[0])) == 1  # one bin holds them all
    assert psi(reference.fractions, reference.counts(np.where(values > 0.9999, np.float32(1.0), values))) == 0.0


def test_reference_round_trips_through_manifest_extra():
    reference = Reference.fit(normal(0, 999), "score")
    extra = json.loads(json.dumps({"feature_names": ["a"], **reference.to_extra()}))
    assert set(extra["score_reference"]) == {"measure", "edges", "fractions", "rows"}
    assert len(extra["score_reference"]["edges"]) == 9 and len(extra["score_reference"]["fractions"]) == 10
    assert Reference.from_extra(extra) == reference


def test_manifests_without_a_reference_still_load():
    assert Reference.from_extra({"feature_names": ["a"]}) is None
    assert Reference.from_extra({}) is None


@pytest.mark.parametrize("entry, message", [
    ({"measure": "score", "edges": [2.0, 1.0], "fractions": [0.3, 0.3, 0.4], "rows": 10}, "ascending"),
    ({"measure": "score", "edges": [1.0], "fractions": [1.0], "rows": 10}, "2 fractions"),
    ({"measure": "latency", "edges": [1.0], "fractions": [0.5, 0.5], "rows": 10}, "measure"),
    ({"measure": "score", "edges": [1.0]}, "expected measure"),
])
def test_a_malformed_reference_is_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        Reference.from_extra({"score_reference": entry})


# ---------------------------------------------------------------------------- window


def test_window_keeps_the_last_rows_in_fixed_memory():
    window = Window(5)
    buffer = window._data
    window.add(np.array([1.0, 2.0, 3.0]))
    assert len(window) == 3 and sorted(window.values()) == [1, 2, 3]
    window.add(np.array([4.0, 5.0, 6.0, 7.0]))  # wraps
    assert len(window) == 5 and sorted(window.values()) == [3, 4, 5, 6, 7]
    window.add(np.arange(100, 112, dtype=np.float64))  # more than it holds at once
    assert sorted(window.values()) == [107, 108, 109, 110, 111]
    for i in range(1000):
        window.add(np.array([float(i)]))
    assert sorted(window.values()) == [995, 996, 997, 998, 999]
    assert window._data is buffer and buffer.shape == (5,)


def test_window_rows_added_together_stay_together():
    window = Window(4, width=2)
    for i in range(7):
        window.add(np.array([[i, 10 * i]]))
    rows = window.values()
    assert sorted(rows[:, 0]) == [3, 4, 5, 6] and (rows[:, 1] == 10 * rows[:, 0]).all()


# ---------------------------------------------------------------------------- drift monitor


def test_drift_monitor_gives_nothing_below_the_minimum_count():
    monitor = DriftMonitor(Reference.fit(normal(0, 5000), "score"), window=1000, min_count=200)
    monitor.observe(normal(1, 199))
    assert monitor.psi() is None
    monitor.observe(normal(2, 1))
    assert monitor.psi() is not None and monitor.psi() < 0.1


def test_drift_monitor_sees_live_scores_drift_from_training():
    monitor = DriftMonitor(Reference.fit(normal(0, 5000), "score"), window=2000)
    for i in range(40):
        monitor.observe(normal(i, 50))  # requests of 50 rows
    assert len(monitor) == 2000 and monitor.psi() < 0.05
    for i in range(40):
        monitor.observe(normal(100 + i, 50, loc=1.0))  # the window now holds only shifted scores
    assert monitor.psi() > 0.2


def test_drift_monitor_ignores_nan_scores():
    monitor = DriftMonitor(Reference.fit(normal(0, 5000), "score"), min_count=10)
    monitor.observe(np.concatenate([normal(1, 300), [np.nan] * 300]))
    assert monitor.psi() < 0.1


# ---------------------------------------------------------------------------- shadow


def test_score_shadow_of_the_same_model_shows_no_divergence():
    shadow = ScoreShadow(primary_threshold=1.5, candidate_threshold=1.5, min_count=200)
    for i in range(100):
        scores = normal(i, 1)
        shadow.add(scores, scores)
        if i == 98:
            assert shadow.figures() == {}  # 99 pairs: too few
    shadow.add(normal(200, 100), normal(200, 100))
    assert shadow.figures() == {"psi": 0.0, "ks": 0.0, "flagged_rate_diff": 0.0}


def test_score_shadow_sees_a_shifted_candidate_and_its_flagged_rate():
    primary, candidate = normal(0, 4000), normal(1, 4000, loc=1.0)
    shadow = ScoreShadow(primary_threshold=2.0, candidate_threshold=2.5)
    for start in range(0, 4000, 16):
        shadow.add(primary[start:start + 16], candidate[start:start + 16])
    figures = shadow.figures()
    assert figures["psi"] > 0.2 and figures["ks"] > 0.3
    want = (candidate > 2.5).mean() - (primary > 2.0).mean()  # each version at its own threshold
    assert figures["flagged_rate_diff"] == pytest.approx(want) and want > 0


def test_agreement_shadow_is_exact():
    shadow = AgreementShadow(min_count=4)
    shadow.add(np.array([1, 2, 3]), np.array([1, 2, 0]))
    assert shadow.figures() == {}
    probabilities = np.array([[0.1, 0.9], [0.8, 0.2]])  # argmax 1, 0
    shadow.add(probabilities, np.array([1, 1]))
    assert shadow.figures() == {"agreement": 3 / 5}


def test_overlap_shadow_is_exact():
    shadow = OverlapShadow(k=3, min_count=1)
    shadow.add(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]]))  # 2/3 and 0
    assert shadow.figures() == {"overlap_at_k": pytest.approx(1 / 3)}
    shadow.add(np.array([[1, 2, 3, 4]]), np.array([[1, 2, 3, 0]]))  # only the first k count: 3/3
    assert shadow.figures() == {"overlap_at_k": pytest.approx((2 / 3 + 0 + 1) / 3)}
    shadow.add(np.array([[7, -1, -1]]), np.array([[7, -1, -1]]))  # padding never matches: 1/3
    assert shadow.figures() == {"overlap_at_k": pytest.approx((2 / 3 + 0 + 1 + 1 / 3) / 4)}


def test_shadows_count_only_the_window():
    shadow = AgreementShadow(window=10, min_count=1)
    shadow.add(np.zeros(100), np.ones(100))  # disagree
    shadow.add(np.ones(10), np.ones(10))     # then agree
    assert shadow.figures() == {"agreement": 1.0} and len(shadow) == 10


def test_shadow_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="3 primary rows and 2 candidate rows"):
        AgreementShadow().add(np.zeros(3), np.zeros(2))


def test_similarities_name_the_higher_is_better_measures():
    shadow = ScoreShadow(1.0, 1.0, min_count=1)
    shadow.add(normal(0, 10), normal(1, 10))
    assert drift.SIMILARITIES == {"agreement", "overlap_at_k"}
    assert not drift.SIMILARITIES & set(shadow.figures())  # the score figures are distances
