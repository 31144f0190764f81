"""Cost accounting: GPU-hours by type, dollars per hour and per million tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebbtide.api.spec import Pricing, SleepPolicy
from ebbtide.policy.cost import (
    MAX_GAP_SECONDS,
    Held,
    Ledger,
    Rate,
    accrue,
    accrue_rate,
    month_start,
    usd_per_hour,
    usd_per_million_tokens,
)

JUNE = 1_717_200_000.0  # 2024-06-01 00:00 UTC

PRICES = Pricing(on_demand_per_gpu_hour=4.0, spot_per_gpu_hour=1.6)
SLEEP = SleepPolicy()


def test_an_hour_of_two_on_demand_and_one_spot_replica_with_two_gpus_each():
    ledger = accrue(Ledger.start(0.0), 0.0, Held(on_demand=2, spot=1), 2, PRICES, SLEEP)
    ledger = accrue(ledger, 3600.0, Held(on_demand=2, spot=1), 2, PRICES, SLEEP)
    assert ledger.gpu_hours_on_demand == pytest.approx(4.0)
    assert ledger.gpu_hours_spot == pytest.approx(2.0)
    assert ledger.usd == pytest.approx(4 * 4.0 + 2 * 1.6)
    assert usd_per_hour(ledger.held, 2, PRICES, SLEEP) == pytest.approx(19.2)


def test_the_interval_is_charged_at_what_held_over_it_not_at_the_new_count():
    ledger = accrue(Ledger.start(0.0), 0.0, Held(on_demand=1), 1, PRICES, SLEEP)
    ledger = accrue(ledger, 1800.0, Held(on_demand=5), 1, PRICES, SLEEP)  # four added now
    assert ledger.gpu_hours_on_demand == pytest.approx(0.5)
    ledger = accrue(ledger, 3600.0, Held(on_demand=5), 1, PRICES, SLEEP)
    assert ledger.gpu_hours_on_demand == pytest.approx(0.5 + 2.5)


def test_sleeping_replicas_are_charged_their_unreclaimed_share():
    sleep = SleepPolicy(reclaimed_fraction=0.75)
    ledger = accrue(Ledger.start(0.0), 0.0, Held(asleep_on_demand=2), 1, PRICES, sleep)
    ledger = accrue(ledger, 3600.0, Held(asleep_on_demand=2), 1, PRICES, sleep)
    assert ledger.gpu_hours_asleep == pytest.approx(0.5)
    assert ledger.usd == pytest.approx(0.5 * 4.0)


def test_an_operator_gap_is_charged_at_the_last_count_but_not_beyond_an_hour():
    ledger = accrue(Ledger.start(0.0), 0.0, Held(spot=1), 1, PRICES, SLEEP)
    ledger = accrue(ledger, 10 * 3600.0, Held(spot=1), 1, PRICES, SLEEP)
    assert ledger.gpu_hours_spot == pytest.approx(MAX_GAP_SECONDS / 3600)


def test_usd_per_million_tokens_is_none_when_nothing_is_served():
    assert usd_per_million_tokens(4.0, 0.0) is None
    assert usd_per_million_tokens(4.0, None) is None
    assert usd_per_million_tokens(4.0, float("nan")) is None
    # One H100 at $4/h serving 1,000 tokens/s: 3.6 M tokens an hour, $1.11 per million.
    assert usd_per_million_tokens(4.0, 1000.0) == pytest.approx(4.0 / 3.6)


def test_variants_are_charged_at_the_rate_the_last_tick_handed_in_reserved_ones_apart():
    # Two reserved H100s (2 GPUs), three on-demand L4s, one spot L40S: 13.2 USD/h.
    rate = Rate(on_demand=3, spot=1, reserved=4, usd=13.2)
    ledger = accrue_rate(Ledger.start(0.0), 0.0, rate)
    ledger = accrue_rate(ledger, 1800.0, Rate(on_demand=1, usd=0.8))  # the new rate starts costing now
    assert (ledger.gpu_hours_on_demand, ledger.gpu_hours_spot, ledger.gpu_hours_reserved) == pytest.approx(
        (1.5, 0.5, 2.0))
    assert ledger.usd == pytest.approx(6.6) and ledger.usd_month == pytest.approx(6.6)
    ledger = accrue_rate(ledger, 3600.0, Rate())
    assert ledger.usd == pytest.approx(6.6 + 0.4)
    # Back to a single fleet: its own count from then on, not the variants' last rate.
    single = accrue(ledger, 3600.0, Held(on_demand=1), 1, PRICES, SLEEP)
    assert single.rate is None and accrue(single, 7200.0, Held(), 1, PRICES, SLEEP).usd == pytest.approx(7.0 + 4.0)


def test_the_month_to_date_restarts_with_the_calendar_month_utc():
    assert month_start(JUNE + 3600) == JUNE and month_start(JUNE - 1) == JUNE - 31 * 24 * 3600
    ledger = accrue_rate(Ledger.start(JUNE - 3600), JUNE - 3600, Rate(on_demand=1, usd=2.0))
    ledger = accrue_rate(ledger, JUNE - 1800, Rate(on_demand=1, usd=2.0))
    assert ledger.usd_month == pytest.approx(1.0)  # half an hour of May
    ledger = accrue_rate(ledger, JUNE + 1800, Rate(on_demand=1, usd=2.0))
    # The interval that crosses midnight: its June half counts for June, the total keeps all.
    assert (ledger.month_start, ledger.usd_month, ledger.usd) == (JUNE, pytest.approx(1.0), pytest.approx(3.0))


def test_the_ledger_round_trips_and_unreadable_ones_start_over():
    ledger = accrue(Ledger.start(10.0), 100.0, Held(1, 2, 3, 4), 1, PRICES, SLEEP)
    assert Ledger.load(ledger.to_json(), 500.0) == ledger
    variants = accrue_rate(accrue_rate(Ledger.start(JUNE), JUNE, Rate(1, 2, 0, 4, 9.5)), JUNE + 60, Rate(1, usd=1))
    assert Ledger.load(variants.to_json(), JUNE + 90) == variants
    # Written before the month was kept: all of it this month's when it began in the month.
    old = {k: v for k, v in variants.to_json().items() if k not in ("month", "rate", "gpuHoursReserved")}
    assert Ledger.load(old, JUNE + 90).usd_month == variants.usd
    assert Ledger.load({**old, "since": JUNE - 60}, JUNE + 90).usd_month == 0.0
    for broken in (None, {}, {"version": 9}, {**ledger.to_json(), "usd": "lots"}, {**ledger.to_json(), "usd": -1}):
        assert Ledger.load(broken, 500.0) == Ledger.start(500.0)


@given(st.lists(st.tuples(st.floats(0, 7200), st.integers(0, 5), st.integers(0, 5)), max_size=30))
def test_totals_never_decrease_and_dollars_match_hours(steps):
    ledger = Ledger.start(0.0)
    now = 0.0
    for dt, on_demand, spot in steps:
        now += dt
        after = accrue(ledger, now, Held(on_demand=on_demand, spot=spot), 1, PRICES, SLEEP)
        assert after.gpu_hours_on_demand >= ledger.gpu_hours_on_demand
        assert after.gpu_hours_spot >= ledger.gpu_hours_spot
        ledger = after
    expected = ledger.gpu_hours_on_demand * 4.0 + ledger.gpu_hours_spot * 1.6
    assert ledger.usd == pytest.approx(expected, rel=1e-9, abs=1e-9)
