"""Spot placement: the split between on-demand and spot replicas, and the timing of the fallback."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide.api.spec import SpotPlacement
from ebbtide.policy.spot import RECLAIM_TAINTS, PodView, SpotPods, classify, shares, split

WINDOW = 300.0  # the scale-down stabilization window the cover is held for
LIMIT = 120.0  # pendingTimeoutSeconds
T0 = 1_000_000.0
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def spot(**fields) -> SpotPlacement:
    return SpotPlacement(enabled=True, **fields)


def pending(name: str, created_at: float) -> PodView:
    return PodView(name=name, ready=False, phase="Pending", created_at=created_at, node=None)


def running(name: str, node: str, ready: bool = True, created_at: float = T0 - 3600) -> PodView:
    return PodView(name=name, ready=ready, phase="Running", created_at=created_at, node=node)


# --- the split ------------------------------------------------------------------------------

def test_the_skyserve_split_and_its_message():
    placed = split(6, spot(on_demand_base=1), SpotPods(ready=2, starting=1, unavailable=2), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot, placed.covering) == (3, 5, 2)
    assert placed.message == ("target 6: spot 5 (2 ready, 1 starting, 2 unavailable), "
                              "on-demand 1 base + 2 covering spot not ready = 3")


def test_all_spot_ready_runs_only_the_base_on_demand():
    placed = split(6, spot(on_demand_base=2), SpotPods(ready=4), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot, placed.cover) == (2, 4, ())


def test_spot_disabled_puts_everything_on_demand():
    placed = split(5, SpotPlacement(enabled=False, on_demand_base=1), SpotPods(unavailable=3), ((T0, 2),), T0, WINDOW)
    assert (placed.on_demand, placed.spot, placed.cover) == (5, 0, ())
    assert "off" in placed.message


def test_starting_spot_pods_are_on_their_way_and_not_covered():
    placed = split(6, spot(on_demand_base=1), SpotPods(starting=5), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (1, 5)


def test_spot_pods_not_created_yet_are_not_covered():
    """Right after a scale-up the ReplicaSet has not made the new pods yet: covering them would
    start (and hold for a whole window) an on-demand replica on every scale-up."""
    placed = split(8, spot(on_demand_base=1), SpotPods(ready=4), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (1, 7)


def test_no_spot_at_all_puts_the_whole_target_on_demand():
    placed = split(6, spot(on_demand_base=1), SpotPods(unavailable=5), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (6, 5)


def test_base_above_target_is_capped_and_no_spot_runs():
    placed = split(2, spot(on_demand_base=4, overprovision=1), SpotPods(), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (2, 0)


def test_target_zero_runs_nothing_not_even_spares():
    placed = split(0, spot(on_demand_base=1, overprovision=2), SpotPods(unavailable=1), ((T0 - 1, 1),), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (0, 0)


def test_overprovision_adds_spare_spot_replicas_and_they_are_covered_like_the_others():
    placed = split(4, spot(on_demand_base=1, overprovision=2), SpotPods(ready=5), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (1, 5)
    assert "2 spare" in placed.message
    # SkyServe's rule covers every spot replica wanted, spares included, up to the target.
    placed = split(4, spot(on_demand_base=1, overprovision=2), SpotPods(ready=3, unavailable=2), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (3, 5)


def test_max_spot_fraction_moves_what_it_takes_from_spot_to_on_demand():
    placed = split(10, spot(on_demand_base=1, max_spot_fraction=0.6), SpotPods(ready=6), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (4, 6)
    assert "3 over the 60% spot cap" in placed.message
    # The share counts spares too: 10 + 2 replicas, at most 40% of them (4) on spot.
    placed = split(10, spot(on_demand_base=0, max_spot_fraction=0.4, overprovision=2), SpotPods(), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (8, 4)
    # No spot at all: the whole target on demand, never more.
    placed = split(5, spot(on_demand_base=1, max_spot_fraction=0.0, overprovision=3), SpotPods(), (), T0, WINDOW)
    assert (placed.on_demand, placed.spot) == (5, 0)


def test_max_spot_fraction_rounds_down_without_float_noise():
    assert shares(100, spot(on_demand_base=0, max_spot_fraction=0.29)).spot == 29
    assert shares(3, spot(on_demand_base=0, max_spot_fraction=0.5)).spot == 1


# --- classifying the spot pods --------------------------------------------------------------

def test_pending_timeout_edges():
    now = T0
    at_limit = pending("a", now - LIMIT)
    past_limit = pending("b", now - LIMIT - 0.001)
    young = pending("c", now - 1)
    assert classify([at_limit, young], set(), LIMIT, now) == SpotPods(starting=2)
    assert classify([past_limit], set(), LIMIT, now) == SpotPods(unavailable=1)
    assert classify([pending("d", now)], set(), 0, now) == SpotPods(starting=1)
    assert classify([pending("d", now - 0.001)], set(), 0, now) == SpotPods(unavailable=1)


def test_a_pod_with_a_node_is_starting_however_long_it_loads():
    """Capacity was found; pulling the image or the weights would take as long on demand."""
    slow = PodView(name="a", ready=False, phase="Pending", created_at=T0 - 10 * LIMIT, node="spot-1")
    loading = running("b", "spot-2", ready=False, created_at=T0 - 10 * LIMIT)
    assert classify([slow, loading], set(), LIMIT, T0) == SpotPods(starting=2)


def test_pods_on_a_reclaimed_node_are_unavailable_even_when_ready():
    pods = [running("a", "spot-1"), running("b", "spot-1", ready=False), running("c", "spot-2"),
            pending("d", T0 - 5)]
    assert classify(pods, {"spot-1"}, LIMIT, T0) == SpotPods(ready=1, starting=1, unavailable=2)


def test_finished_pods_are_not_counted():
    done = PodView(name="a", ready=False, phase="Failed", created_at=T0 - 10 * LIMIT, node=None)
    assert classify([done], set(), LIMIT, T0) == SpotPods()


def test_reclaim_taints_are_the_documented_ones():
    for key in ("karpenter.sh/disrupted", "aws-node-termination-handler/spot-itn",
                "cloud.google.com/impending-node-termination", "ToBeDeletedByClusterAutoscaler",
                "node.kubernetes.io/unschedulable"):
        assert key in RECLAIM_TAINTS


# --- the fallback over time -----------------------------------------------------------------

class Service:
    """A service with spot placement ticking through time, as the shell drives the core."""

    def __init__(self, target: int, placement: SpotPlacement, window: float = WINDOW):
        self.target, self.placement, self.window = target, placement, window
        self.cover: tuple = ()

    def tick(self, pods: list[PodView], now: float, reclaimed: frozenset[str] = frozenset()):
        seen = classify(pods, set(reclaimed), self.placement.pending_timeout_seconds, now)
        placed = split(self.target, self.placement, seen, self.cover, now, self.window)
        self.cover = placed.cover
        return placed


def test_pending_spot_is_covered_only_past_the_limit_and_given_back_one_window_after_it_is_ready():
    service = Service(3, spot(on_demand_base=1, pending_timeout_seconds=int(LIMIT)))
    pods = [pending("a", T0), pending("b", T0)]
    assert service.tick(pods, T0 + LIMIT).on_demand == 1, "on their way until the limit"
    assert service.tick(pods, T0 + LIMIT + 1).on_demand == 3, "covered once past it"
    # Capacity returns: the pods land and load. Still covered while they are not ready: the
    # window starts at the last tick they were not (a cold start may outlast the window).
    landed = [running("a", "spot-1", ready=False), running("b", "spot-1", ready=False)]
    assert service.tick(landed, T0 + 200).on_demand == 3
    ready = [running("a", "spot-1"), running("b", "spot-1")]
    last_needed = T0 + 200
    held = service.tick(ready, T0 + 300)
    assert (held.on_demand, held.covering) == (3, 2)
    assert "given back" in held.message
    assert service.tick(ready, last_needed + WINDOW - 1).on_demand == 3, "held for the whole window"
    given_back = service.tick(ready, last_needed + WINDOW)
    assert (given_back.on_demand, given_back.cover) == (1, ())


def test_a_reclaim_is_covered_at_once_and_the_replacement_does_not_end_the_cover():
    service = Service(4, spot(on_demand_base=1))
    pods = [running("a", "spot-1"), running("b", "spot-1"), running("c", "spot-2")]
    assert service.tick(pods, T0).on_demand == 1
    reclaim = service.tick(pods, T0 + 15, reclaimed=frozenset({"spot-1"}))
    assert (reclaim.on_demand, reclaim.spot) == (3, 3), "both replicas on the reclaimed node, at once"
    # The node is gone, the ReplicaSet made replacements: they look for capacity (starting).
    replaced = [pending("d", T0 + 140), pending("e", T0 + 140), running("c", "spot-2")]
    assert service.tick(replaced, T0 + 150).on_demand == 3, "the cover is held while they start"
    ready = [running("d", "spot-3"), running("e", "spot-3"), running("c", "spot-2")]
    assert service.tick(ready, T0 + 150 + WINDOW - 1).on_demand == 3
    assert service.tick(ready, T0 + 150 + WINDOW).on_demand == 1, "one window after the last start"


def test_a_cover_in_place_outlasts_a_cold_start_longer_than_the_window():
    service = Service(3, spot(on_demand_base=1, pending_timeout_seconds=int(LIMIT)), window=60.0)
    for t in range(int(LIMIT) + 1, 200, 15):  # no spot capacity: Pending, covered
        assert service.tick([pending("a", T0), pending("b", T0)], T0 + t).on_demand == 3, t
    loading = [running("a", "spot-1", ready=False), running("b", "spot-1", ready=False)]
    for t in range(200, 800, 15):  # ten minutes loading the model, far beyond the 60 s window
        assert service.tick(loading, T0 + t).on_demand == 3, t
    ready = [running("a", "spot-1"), running("b", "spot-1")]
    assert service.tick(ready, T0 + 800).on_demand == 3
    assert service.tick(ready, T0 + 785 + 60).on_demand == 1


def test_cover_steps_down_as_each_need_leaves_the_window():
    placement = spot(on_demand_base=1)
    first = split(6, placement, SpotPods(ready=2, unavailable=3), (), T0, WINDOW)
    assert first.on_demand == 4
    cover = split(6, placement, SpotPods(ready=4, unavailable=1), first.cover, T0 + 100, WINDOW).cover
    assert split(6, placement, SpotPods(ready=5), cover, T0 + WINDOW - 1, WINDOW).on_demand == 4
    assert split(6, placement, SpotPods(ready=5), cover, T0 + WINDOW, WINDOW).on_demand == 2
    assert split(6, placement, SpotPods(ready=5), cover, T0 + 100 + WINDOW, WINDOW).on_demand == 1


def test_a_lower_target_shrinks_on_demand_even_while_cover_is_held():
    placement = spot(on_demand_base=1)
    covered = split(6, placement, SpotPods(ready=2, unavailable=3), (), T0, WINDOW)
    assert covered.on_demand == 4
    # The autoscaler scaled down to 3: 1 base + 2 spot, both ready. The held cover (3) is
    # capped by the 2 spot replicas now wanted and the target.
    lower = split(3, placement, SpotPods(ready=2), covered.cover, T0 + 30, WINDOW)
    assert (lower.on_demand, lower.spot) == (3, 2)
    lowest = split(1, placement, SpotPods(ready=2), covered.cover, T0 + 60, WINDOW)
    assert (lowest.on_demand, lowest.spot) == (1, 0)


def test_no_window_means_no_history_and_an_immediate_give_back():
    placement = spot(on_demand_base=1)
    covered = split(4, placement, SpotPods(ready=1, unavailable=2), (), T0, 0)
    assert (covered.on_demand, covered.cover) == (3, ())
    assert split(4, placement, SpotPods(ready=3), covered.cover, T0 + 1, 0).on_demand == 1


# --- properties -----------------------------------------------------------------------------

placements = st.builds(
    lambda base, fraction, spares, limit: spot(on_demand_base=base, max_spot_fraction=fraction,
                                               overprovision=spares, pending_timeout_seconds=limit),
    st.integers(0, 12), st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0]), st.integers(0, 4),
    st.integers(0, 600))
spot_pods = st.builds(SpotPods, st.integers(0, 20), st.integers(0, 20), st.integers(0, 20))
histories = st.lists(st.tuples(st.floats(T0 - 2 * WINDOW, T0), st.integers(0, 20)), max_size=6).map(
    lambda entries: tuple(sorted(entries)))


@FAST
@given(target=st.integers(0, 30), placement=placements, pods=spot_pods, cover=histories,
       window=st.sampled_from([0.0, 60.0, WINDOW]))
def test_split_bounds(target, placement, pods, cover, window):
    placed = split(target, placement, pods, cover, T0, window)
    assert 0 <= placed.on_demand <= target
    assert placed.spot >= 0
    assert placed.on_demand >= min(placement.on_demand_base, target), "the base always runs on demand"
    assert placed.spot <= placement.max_spot_fraction * (target + placement.overprovision) + 1e-9
    assert placed.on_demand + placed.spot >= target, "every replica wanted runs somewhere"
    assert 0 <= placed.covering <= placed.spot
    if target == 0:
        assert (placed.on_demand, placed.spot) == (0, 0)
    assert str(placed.on_demand) in placed.message


@FAST
@given(target=st.integers(0, 30), placement=placements, pods=spot_pods)
def test_the_target_is_served_by_on_demand_and_spot_on_its_way(target, placement, pods):
    """With every wanted spot pod created, the on-demand ones plus the spot ones ready or on
    their way add up to the target: nothing the autoscaler asked for is left uncovered."""
    placed = split(target, placement, pods, (), T0, WINDOW)
    if pods.ready + pods.starting + pods.unavailable >= placed.spot:
        assert placed.on_demand + min(placed.spot, pods.ready + pods.starting) >= target
    if pods.ready == pods.starting == 0 and pods.unavailable >= placed.spot:
        assert placed.on_demand == target, "no spot there: all on demand"


@FAST
@given(target=st.integers(0, 20), placement=placements,
       ticks=st.lists(st.tuples(st.floats(0.5, 200), spot_pods), min_size=1, max_size=25),
       window=st.sampled_from([30.0, WINDOW]))
def test_cover_is_the_highest_need_over_the_window(target, placement, ticks, window):
    """Against a brute-force oracle that keeps every tick: with a steady target, on-demand is
    at least the most any tick in the last window would have wanted with no give-back delay
    (more while a cover in place waits for its replacements to be ready), and never more than
    covering every spot replica."""
    cover, now, seen = (), T0, []
    for dt, pods in ticks:
        now += dt
        instant = split(target, placement, pods, (), now, 0.0).on_demand
        seen.append((now, instant))
        placed = split(target, placement, pods, cover, now, window)
        cover = placed.cover
        assert placed.on_demand >= max(v for t, v in seen if t > now - window)
        assert placed.on_demand <= split(target, placement, SpotPods(unavailable=10**6), (), now, 0.0).on_demand
        assert len(cover) <= target + 1, "the history stays small"
