"""Tests of market clustering, cluster order keys, ranking and outputs."""

import json
import logging
import math

import cv2
import numpy as np
import pytest

import area_anomaly as aa
from spatial_anomaly import box_distance

BOUGHT, MERGED, NO_CHANGE = aa.STATUS_BOUGHT, aa.STATUS_MERGED, aa.STATUS_NO_CHANGE


def row_box(cmin, cmax):
    """Padded box on rows 0..4, so that boxes on this row differ only in columns."""
    return (0.0, 4.0, float(cmin), float(cmax))


def wallet(score):
    return math.exp(28 * math.sqrt(score))


def expected_price(distance, score_outside, score_member, merge=False):
    """Price from the formulas of the method, written out independently of the module."""
    price = math.exp(1.7 * math.sqrt(distance))
    price *= (1 - math.sqrt(0.95 * score_outside) * math.sqrt(0.95 * score_member)) ** 1.6
    if merge:
        price *= (1 - (0.95 * score_outside) ** 0.05 * (0.95 * score_member) ** 0.05) ** 2.5
        price *= (2 - abs(score_outside - score_member)) ** 8
    return price


def run(boxes, scores, k, reference=False, areas=None):
    boxes = np.array(boxes, dtype=np.float64)
    if areas is None:
        areas = np.full(len(boxes), 4, dtype=np.int64)
    return aa.run_market_clustering(boxes, areas, np.array(scores, dtype=np.float64), k=k, reference=reference)


# Market clustering on hand cases


def test_seeds_and_wallets():
    boxes = [row_box(0, 2), row_box(100, 102), row_box(200, 202)]
    market = run(boxes, [0.25, 0.81, 0.64], k=2)

    assert [seed["core_impurities"] for seed in market.initial_clusters] == [[1], [2]]
    assert [seed["impurities"] for seed in market.initial_clusters] == [[1], [2]]
    assert market.initial_clusters[0]["wallet"] == pytest.approx(math.exp(28 * 0.9), rel=1e-14)
    assert market.initial_clusters[1]["wallet"] == pytest.approx(math.exp(28 * 0.8), rel=1e-14)


def test_seed_ties_go_to_higher_id():
    # Equal scores sort by id ascending, so the higher id counts as the higher scorer.
    market = run([row_box(0, 2), row_box(100, 102)], [0.5, 0.5], k=1)
    assert market.initial_clusters[0]["core_impurities"] == [1]


def test_purchase_pays_price():
    boxes = [row_box(0, 2), row_box(6, 8)]  # column gap 4
    market = run(boxes, [0.81, 0.36], k=1)

    price = expected_price(4, 0.36, 0.81)
    bought = market.events[0]
    assert bought["status"] == BOUGHT
    assert bought["impurity"] == 1
    assert bought["cheapest_member"] == 0
    assert bought["price"] == pytest.approx(price, rel=1e-12)
    assert bought["wallet_after"] == pytest.approx(wallet(0.81) - price, rel=1e-12)

    # Nothing is left outside, so the next attempt finds no impurity and clustering ends.
    assert market.events[1] == {
        "cluster_first_core": 0,
        "impurity": None,
        "cheapest_member": None,
        "price": None,
        "holder_cores": None,
        "status": NO_CHANGE,
        "wallet_after": bought["wallet_after"],
    }
    assert len(market.events) == 2
    assert market.clusters[0].impurities == [0, 1]


def test_purchase_rejected_without_money():
    boxes = [row_box(0, 2), row_box(102, 104)]  # gap 100: price near exp(17)
    market = run(boxes, [0.01, 0.005], k=1)

    assert len(market.events) == 1
    rejected = market.events[0]
    assert rejected["status"] == NO_CHANGE
    assert rejected["impurity"] == 1
    assert rejected["price"] == pytest.approx(expected_price(100, 0.005, 0.01), rel=1e-12)
    assert rejected["price"] > wallet(0.01)
    assert rejected["wallet_after"] == pytest.approx(wallet(0.01), rel=1e-14)
    assert market.clusters[0].impurities == [0]


def test_merge_is_free_even_when_unaffordable():
    boxes = [row_box(0, 2), row_box(402, 404)]  # gap 400
    market = run(boxes, [0.04, 0.01], k=2)

    merge = market.events[0]
    assert merge["status"] == MERGED
    assert merge["cluster_first_core"] == 0
    assert merge["impurity"] == 1
    assert merge["holder_cores"] == [1]
    assert merge["price"] == pytest.approx(expected_price(400, 0.01, 0.04, merge=True), rel=1e-12)
    assert merge["price"] > wallet(0.04)
    assert merge["wallet_after"] == pytest.approx(wallet(0.04) + wallet(0.01), rel=1e-14)

    assert len(market.clusters) == 1
    assert market.clusters[0].core_impurities == [0, 1]
    assert market.clusters[0].impurities == [0, 1]


def test_auction_rule():
    # Ids: 0 seed A (rich), 1 seed B (poor), 2 x next to A, 3 y between x and B.
    # Columns: A 0-2, x 6-8, y 12-14, B 20-22.
    boxes = [row_box(0, 2), row_box(20, 22), row_box(6, 8), row_box(12, 14)]
    scores = [0.09, 0.04, 0.02, 0.01]
    market = run(boxes, scores, k=2)
    events = market.events

    # Pass 1: A buys x and stores its wallet on x.
    assert (events[0]["cluster_first_core"], events[0]["impurity"], events[0]["status"]) == (0, 2, BOUGHT)

    # B skips x, which is cheaper for it than y, because A's stored wallet exceeds B's.
    price_x_for_b = expected_price(12 - 8, 0.02, 0.04)
    price_y_for_b = expected_price(20 - 14, 0.01, 0.04)
    assert price_x_for_b < price_y_for_b
    assert (events[1]["cluster_first_core"], events[1]["impurity"], events[1]["status"]) == (1, 3, BOUGHT)
    assert events[1]["price"] == pytest.approx(price_y_for_b, rel=1e-12)

    # Pass 2: A's wallet exceeds the one B stored on y, so A takes y from B, priced at x.
    assert (events[2]["cluster_first_core"], events[2]["impurity"], events[2]["status"]) == (0, 3, BOUGHT)
    assert events[2]["cheapest_member"] == 2
    assert events[2]["holder_cores"] == [1]
    assert events[2]["price"] == pytest.approx(expected_price(12 - 8, 0.01, 0.02), rel=1e-12)

    # B cannot bid for y or x any more, so its cheapest eligible impurity is A's core: a merge.
    assert (events[3]["cluster_first_core"], events[3]["impurity"], events[3]["status"]) == (1, 0, MERGED)
    assert market.clusters[0].core_impurities == [1, 0]
    assert market.clusters[0].impurities == [1, 0, 2, 3]


def test_default_prices_against_all_members():
    # Seed S at columns 0-2, a at 6-8 (gap 4 to S), b at 14-16 (gap 6 to a, 12 to S).
    # The wallet of S covers a and then b at distance 6, but not b at distance 12.
    boxes = [row_box(0, 2), row_box(6, 8), row_box(14, 16)]
    scores = [0.04, 0.03, 0.02]
    money_after_a = wallet(0.04) - expected_price(4, 0.03, 0.04)
    assert expected_price(6, 0.02, 0.03) < money_after_a < expected_price(12, 0.02, 0.04)

    default = run(boxes, scores, k=1)
    reference = run(boxes, scores, k=1, reference=True)

    assert default.clusters[0].impurities == [0, 1, 2]
    assert default.events[1]["cheapest_member"] == 1
    assert default.events[1]["price"] == pytest.approx(expected_price(6, 0.02, 0.03), rel=1e-12)
    assert reference.clusters[0].impurities == [0, 1]
    assert reference.events[1]["cheapest_member"] == 0
    assert reference.events[1]["status"] == NO_CHANGE


# Ids: 0 rich seed A at columns 0-2, 1 x (gap 4 to A), 2 y (gap 10 to A), 3 seed B
# far away at 1000-1002, 4 z at gap 100 from B. B cannot pay for z, and merging
# A would cost it more than z, so B makes no change in any pass.
STOP_BOXES = [row_box(0, 2), row_box(6, 8), row_box(12, 14), row_box(1000, 1002), row_box(1102, 1104)]
STOP_SCORES = [0.81, 0.2, 0.1, 0.3, 0.05]


def test_reference_stops_after_last_cluster_fails():
    reference = run(STOP_BOXES, STOP_SCORES, k=2, reference=True)
    default = run(STOP_BOXES, STOP_SCORES, k=2)

    # Pass 1: A buys x and B cannot pay for z, so the reference stops there.
    assert [(e["cluster_first_core"], e["impurity"], e["status"]) for e in reference.events] == [
        (0, 1, BOUGHT),
        (3, 4, NO_CHANGE),
    ]
    assert reference.events[1]["price"] > wallet(0.3)
    assert sorted(cluster.impurities for cluster in reference.clusters) == [[0, 1], [3]]

    # By default A keeps buying in pass 2, although B still cannot.
    assert [(e["cluster_first_core"], e["impurity"], e["status"]) for e in default.events[:4]] == [
        (0, 1, BOUGHT),
        (3, 4, NO_CHANGE),
        (0, 2, BOUGHT),
        (3, 4, NO_CHANGE),
    ]
    assert default.converged


def test_fewer_scores_than_k(caplog):
    boxes = [row_box(0, 2), row_box(100, 102), row_box(200, 202), row_box(300, 302)]
    with caplog.at_level(logging.WARNING, logger="area_anomaly"):
        market = run(boxes, [0.5, 0.0, 0.3, 0.2], k=10)

    assert len(market.initial_clusters) == 3
    assert [seed["core_impurities"] for seed in market.initial_clusters] == [[0], [2], [3]]
    assert "k=10" in caplog.text
    assert "k=3" in caplog.text
    assert all(1 not in cluster.impurities for cluster in market.clusters)


def test_no_scores_gives_no_clusters():
    boxes = np.array([row_box(0, 2), row_box(10, 12)])
    assert aa.market_clustering(boxes, np.array([4, 4]), np.zeros(2)) == []
    assert run(boxes, [0.0, 0.0], k=10).events == []


@pytest.mark.parametrize("bad_score", [np.nan, -0.1, 1.5, np.inf])
def test_invalid_scores_rejected(bad_score):
    with pytest.raises(ValueError, match="0..1"):
        run([row_box(0, 2), row_box(10, 12)], [0.5, bad_score], k=1)


def test_attempt_cap_logs_warning(caplog):
    boxes = [row_box(0, 2), row_box(6, 8), row_box(12, 14)]
    with caplog.at_level(logging.WARNING, logger="area_anomaly"):
        market = aa.run_market_clustering(np.array(boxes), np.full(3, 4), np.array([0.8, 0.5, 0.4]), k=1, max_attempts=1)
    assert not market.converged
    assert len(market.events) == 1
    assert "stopped after 1 expansion attempts" in caplog.text


# A direct implementation that loops over every (outside impurity, member) pair


def naive_market_events(boxes, scores, k, reference):
    participants = sorted((i for i in range(len(scores)) if scores[i] > 0), key=lambda i: (scores[i], i))
    clusters = [
        {"cores": [i], "members": [i], "wallet": wallet(scores[i])} for i in reversed(participants[-k:])
    ]
    stored = {}
    events = []

    def holder_of(impurity):
        return next((cluster for cluster in clusters if impurity in cluster["members"]), None)

    while True:
        clusters.sort(key=lambda cluster: -cluster["wallet"])
        changed = False
        status = NO_CHANGE
        for cluster in list(clusters):
            best = None
            pricing_members = cluster["members"][:1] if reference else cluster["members"]
            for outside in participants:
                if outside in cluster["members"]:
                    continue
                if outside in stored and not stored[outside] < cluster["wallet"]:
                    continue
                holder = holder_of(outside)
                is_core = holder is not None and outside in holder["cores"]
                for member in pricing_members:
                    distance = box_distance(boxes[outside], boxes[member])
                    price = expected_price(distance, scores[outside], scores[member], merge=is_core)
                    if best is None or price < best[0]:
                        best = (price, outside, member, holder, is_core)

            if best is None:
                status = NO_CHANGE
                events.append((cluster["cores"][0], None, None, None, status))
            else:
                price, outside, member, holder, is_core = best
                if is_core:
                    stored[outside] = cluster["wallet"]
                    cluster["wallet"] += holder["wallet"]
                    cluster["cores"] += holder["cores"]
                    cluster["members"] += holder["members"]
                    clusters.remove(holder)
                    status = MERGED
                elif cluster["wallet"] >= price:
                    stored[outside] = cluster["wallet"]
                    cluster["wallet"] -= price
                    if holder is not None:
                        holder["members"].remove(outside)
                    cluster["members"].append(outside)
                    status = BOUGHT
                else:
                    status = NO_CHANGE
                events.append((cluster["cores"][0], outside, member, price, status))
            changed = changed or status != NO_CHANGE
            if status == MERGED:
                break

        if status == MERGED:
            continue
        if (reference and status == NO_CHANGE) or (not reference and not changed):
            return events, sorted(sorted(cluster["members"]) for cluster in clusters)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_implementation(seed, reference):
    rng = np.random.default_rng(seed)
    count = 14
    spread = 40 if seed % 2 == 0 else 150  # dense layouts trade impurities, sparse ones refuse prices
    rows = rng.integers(0, spread, count)
    columns = rng.integers(0, spread, count)
    heights = rng.integers(1, 4, count)
    widths = rng.integers(1, 4, count)
    boxes = np.stack([rows - 1, rows + heights + 1, columns - 1, columns + widths + 1], axis=1).astype(float)
    scores = rng.uniform(0.0, 0.3, count)
    scores[rng.random(count) < 0.2] = 0.0

    market = aa.run_market_clustering(boxes, heights * widths, scores, k=4, reference=reference)
    expected_events, expected_clusters = naive_market_events(boxes, scores, 4, reference)

    assert len(market.events) == len(expected_events)
    for event, (first_core, impurity, member, price, status) in zip(market.events, expected_events):
        assert (event["cluster_first_core"], event["impurity"], event["cheapest_member"], event["status"]) == (
            first_core,
            impurity,
            member,
            status,
        )
        if price is not None:
            assert event["price"] == pytest.approx(price, rel=1e-12)
    assert sorted(sorted(cluster.impurities) for cluster in market.clusters) == expected_clusters


# Order keys and names


def test_order_keys_hand_cluster():
    # Pairwise box distances: 0-1 gap 3 in columns, 0-2 gap 4 in rows, 1-2 both gaps: 5.
    boxes = np.array([(0, 2, 0, 2), (0, 2, 5, 7), (6, 8, 0, 2)], dtype=float)
    areas = np.array([2, 3, 5])
    scores = np.array([0.2, 0.4, 0.6])

    keys = aa.cluster_order_keys([0, 1, 2], boxes, areas, scores)

    assert list(keys) == list(aa.ORDER_KEYS)
    expected = {
        "median": 0.4,
        "mean": 0.4,
        "sum": 1.2,
        "amount": 3,
        "areas_sum": 10,
        "diameter": 5.0,
        "amount_div_diameter": 0.6,
        "amount_mult_diameter": 15.0,
        "sum_div_diameter": 0.24,
        "area_sum_div_diameter": 2.0,
        "area_sum_mult_diameter": 50.0,
        "weighted_area_sum_mult_diameter": 23.0,  # (0.4 + 1.2 + 3.0) * 5
        "weighted_area_sum_mult_diameter_mult_amount": 69.0,
        "weighted_area2_sum_mult_diameter": 97.0,  # (0.8 + 3.6 + 15.0) * 5
        "weighted_area2_sum_mult_diameter_mult_amount": 291.0,
    }
    for name, value in expected.items():
        assert keys[name] == pytest.approx(value, rel=1e-14), name
    assert isinstance(keys["amount"], int)
    assert isinstance(keys["areas_sum"], int)


def test_order_keys_zero_diameter():
    boxes = np.array([(0, 4, 0, 4), (1, 3, 1, 3)], dtype=float)  # overlapping boxes
    keys = aa.cluster_order_keys([0, 1], boxes, np.array([9, 1]), np.array([0.5, 0.3]))

    assert keys["diameter"] == 0
    for name in ("amount_div_diameter", "sum_div_diameter", "area_sum_div_diameter"):
        assert keys[name] == -1, name
    assert keys["amount_mult_diameter"] == 0
    assert keys["weighted_area_sum_mult_diameter_mult_amount"] == 0
    assert keys["median"] == pytest.approx(0.4, rel=1e-14)


@pytest.mark.parametrize(
    ("count", "names"),
    [
        (1, ["color_1"]),
        (2, ["color_0.0", "color_1.0"]),
        (3, ["color_0.0", "color_0.5", "color_1.0"]),
        (4, ["color_0.0", "color_0.333", "color_0.667", "color_1.0"]),
    ],
)
def test_cluster_names(count, names):
    assert [aa.cluster_name(position, count) for position in range(count)] == names


def test_clusters_sorted_by_scan_order_key():
    clusters = run(STOP_BOXES, STOP_SCORES, k=2, reference=True).clusters

    # B alone has diameter 0, so its key is 0 and it comes first.
    assert [cluster.impurities for cluster in clusters] == [[3], [0, 1]]
    assert [cluster.order_keys[aa.SCAN_ORDER_KEY] for cluster in clusters][0] == 0
    assert [cluster.name for cluster in clusters] == ["color_0.0", "color_1.0"]


# Clusters log, ranking and printing


def hand_cluster(name, amount):
    keys = {key: float(amount) for key in aa.ORDER_KEYS}
    keys["amount"] = amount
    return aa.AnomalyCluster(name=name, core_impurities=[0], impurities=[0], wallet=1.0, order_keys=keys)


def hand_log():
    scores = np.array([0.5])
    return [
        aa.clusters_log_entry("a.png", "plots/a.png", [hand_cluster("color_0.0", 5), hand_cluster("color_1.0", 3)], scores),
        aa.clusters_log_entry("b.png", "plots/b.png", [hand_cluster("color_0.0", 3), hand_cluster("color_1.0", 1)], scores),
    ]


def is_plain_json(value):
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain_json(item) for key, item in value.items())
    if isinstance(value, list):
        return all(is_plain_json(item) for item in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or type(value) in (str, int, bool)


def test_log_entry_plain_json():
    boxes = [row_box(0, 2), row_box(6, 8)]
    scores = np.array([0.81, 0.36])
    clusters = aa.market_clustering(np.array(boxes), np.array([4, 4]), scores, k=1)

    entry = aa.clusters_log_entry("scan.png", "plots/scan.png", clusters, scores)

    assert is_plain_json(entry)
    assert entry["clusters"][0]["cluster_name"] == "color_1"
    assert entry["clusters"][0]["impurities"] == [{"id": 0, "score": 0.81}, {"id": 1, "score": 0.36}]
    assert [key["name"] for key in entry["clusters"][0]["order_keys"]] == list(aa.ORDER_KEYS)
    json.dumps(entry, allow_nan=False)


def test_log_replaces_same_scan(tmp_path):
    log_path = tmp_path / "clusters.json"
    first, second = hand_log()
    replacement = dict(first, plot_path="plots/a2.png")

    aa.update_clusters_log(log_path, first)
    aa.update_clusters_log(log_path, second)
    aa.update_clusters_log(log_path, replacement)

    entries = aa.read_clusters_log(log_path)
    assert [entry["scan_name"] for entry in entries] == ["a.png", "b.png"]
    assert entries[0]["plot_path"] == "plots/a2.png"


def test_corrupt_log_names_file(tmp_path):
    log_path = tmp_path / "clusters.json"
    log_path.write_text("[{broken")
    with pytest.raises(ValueError, match="clusters.json"):
        aa.update_clusters_log(log_path, hand_log()[0])

    log_path.write_text('{"scan_name": "a.png"}')
    with pytest.raises(ValueError, match="clusters.json"):
        aa.read_clusters_log(log_path)


def test_ranking_and_deciles():
    ordered = aa.order_clusters(hand_log())
    amount = next(key for key in ordered["order_keys"] if key["key_name"] == "amount")

    assert [key["key_name"] for key in ordered["order_keys"]] == list(aa.ORDER_KEYS)
    ranked = [(c["rank"], c["scan_name"], c["cluster_name"], c["score"], c["norm_score"]) for c in amount["sorted_clusters"]]
    # Equal scores keep log order.
    assert ranked == [
        (1, "a.png", "color_0.0", 5.0, 1.0),
        (2, "a.png", "color_1.0", 3.0, 0.5),
        (3, "b.png", "color_0.0", 3.0, 0.5),
        (4, "b.png", "color_1.0", 1.0, 0.0),
    ]

    # Percentiles of (0, 0.5, 0.5, 1) with linear interpolation.
    boundaries = [0.0, 0.15, 0.3, 0.45, 0.5, 0.5, 0.5, 0.55, 0.7, 0.85, 1.0]
    assert [d["range"] for d in amount["deciles"]] == list(aa.DECILE_LABELS)
    assert [d["lower"] for d in amount["deciles"]] == pytest.approx(boundaries[:-1], abs=1e-15)
    assert [d["upper"] for d in amount["deciles"]] == pytest.approx(boundaries[1:], abs=1e-15)

    # 0.5 lies in [0.5, 0.55), the highest decile starting at 0.5.
    assert [c["decile"] for c in amount["sorted_clusters"]] == ["90%-100%", "60%-70%", "60%-70%", "0%-10%"]
    assert is_plain_json(ordered)


def test_constant_scores_normalise_to_zero():
    scores = np.array([0.5])
    log = [aa.clusters_log_entry("a.png", "a.png", [hand_cluster("color_0.0", 2), hand_cluster("color_1.0", 2)], scores)]

    ordered = aa.order_clusters(log)

    for key in ordered["order_keys"]:
        assert [c["norm_score"] for c in key["sorted_clusters"]] == [0.0, 0.0]
        assert all(d["lower"] == 0.0 and d["upper"] == 0.0 for d in key["deciles"])


def test_empty_log_orders_nothing():
    ordered = aa.order_clusters([{"scan_name": "a.png", "plot_path": "a.png", "clusters": []}])
    assert ordered["scan_names"] == ["a.png"]
    assert all(key["sorted_clusters"] == [] and key["deciles"] == [] for key in ordered["order_keys"])


def test_order_rows_table_and_csv(tmp_path):
    ordered = aa.order_clusters(hand_log())

    rows = aa.order_rows(ordered, ["b.png"], "amount")
    assert [(row["scan"], row["rank"], row["cluster"]) for row in rows] == [("b.png", 3, "color_0.0"), ("b.png", 4, "color_1.0")]
    assert len(aa.order_rows(ordered, None, "amount")) == 4

    table = aa.format_order_table(rows).splitlines()
    assert table[0].split() == list(aa.ORDER_ROW_COLUMNS)
    assert table[2].split() == ["b.png", "3", "color_0.0", "3", "0.5", "60%-70%"]

    csv_path = tmp_path / "order.csv"
    aa.write_order_csv(rows, csv_path)
    assert csv_path.read_text().splitlines()[0] == ",".join(aa.ORDER_ROW_COLUMNS)

    with pytest.raises(ValueError, match="unknown order key"):
        aa.order_rows(ordered, None, "volume")
    with pytest.raises(ValueError, match="c.png"):
        aa.order_rows(ordered, ["c.png"], "amount")


def test_write_ordered_roundtrip(tmp_path):
    ordered = aa.order_clusters(hand_log())
    aa.write_ordered(ordered, tmp_path / "ordered.json")
    assert json.loads((tmp_path / "ordered.json").read_text()) == ordered


# Plots


def hand_markers():
    # Background 1, boundary -1 in column 0, impurities 0..2 as labels 2..4.
    markers = np.ones((6, 8), dtype=np.int32)
    markers[:, 0] = -1
    markers[1:3, 1:3] = 2
    markers[1:3, 4:6] = 3
    markers[4:6, 4:6] = 4
    return markers


def test_area_image_colours():
    from matplotlib import colormaps

    clusters = [hand_cluster("color_0.0", 1), hand_cluster("color_1.0", 1)]
    clusters[0].impurities = [1]
    clusters[1].impurities = [2]

    image = aa.area_anomaly_image(hand_markers(), [0, 1, 2], clusters)

    assert image.shape == (6, 8, 3)
    assert tuple(image[0, 0]) == (255, 255, 255)  # boundary
    assert tuple(image[0, 7]) == (255, 255, 255)  # background
    assert tuple(image[1, 1]) == (0, 0, 0)  # significant, in no cluster
    for row, column, value in ((1, 4, 0.0), (4, 4, 1.0)):
        expected = tuple(int(round(channel * 255)) for channel in colormaps["jet"](value)[:3])
        assert tuple(image[row, column]) == expected


def test_plot_area_anomaly_writes_png(tmp_path):
    clusters = [hand_cluster("color_1", 1)]
    clusters[0].impurities = [2]
    path = tmp_path / "plots" / "scan.png"

    aa.plot_area_anomaly(hand_markers(), [0, 1, 2], clusters, path, title="scan: area anomaly")

    assert cv2.imread(str(path)) is not None
    assert [p.name for p in path.parent.iterdir()] == ["scan.png"]


def test_top_ranked_plots(tmp_path, caplog):
    plot_path = tmp_path / "a_area.png"
    cv2.imwrite(str(plot_path), np.zeros((50, 80, 3), dtype=np.uint8))
    log = hand_log()
    log[0]["plot_path"] = str(plot_path)
    log[1]["plot_path"] = str(tmp_path / "missing.png")
    ordered = aa.order_clusters(log)
    ordered["order_keys"] = ordered["order_keys"][3:4]  # "amount" only, to keep the test fast

    with caplog.at_level(logging.WARNING, logger="area_anomaly"):
        written = aa.save_top_ranked_plots(ordered, log, tmp_path / "top", top=3)

    # Ranks 1 and 2 belong to a.png; rank 3 belongs to b.png, whose plot is missing.
    assert sorted(written) == [str(tmp_path / "top" / "amount" / f"{rank}.png") for rank in (1, 2)]
    image = cv2.imread(written[0])
    assert image.shape == (50 + aa.TOP_PLOT_TITLE_PX, 80, 3)
    assert "missing.png" in caplog.text


def test_order_histograms(tmp_path):
    ordered = aa.order_clusters(hand_log())
    ordered["order_keys"] = ordered["order_keys"][3:4]

    written = aa.plot_order_histograms(ordered, tmp_path)

    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["all.png", "decile_0-10.png", "decile_60-70.png", "decile_90-100.png"]
    assert all(cv2.imread(p) is not None for p in written)


# Reference implementation on scan1tag-47


REFERENCE_EVENT_KEYS = {
    "cluster_core0": "cluster_first_core",
    "impurity": "impurity",
    "cheapest_inside": "cheapest_member",
    "price": "price",
    "containing_cluster_core": "holder_cores",
    "status": "status",
    "wallet_after": "wallet_after",
}


def test_reference_reproduction(reference_dir):
    arrays = np.load(reference_dir / "scan1tag-47.npz")
    expected = json.loads((reference_dir / "scan1tag-47_clusters_first_core_pricing.json").read_text())

    market = aa.run_market_clustering(
        arrays["imp_boxes"], arrays["areas"], arrays["spatial_k50"], k=expected["k"], reference=True
    )

    assert len(market.initial_clusters) == len(expected["initial_clusters"])
    for seed, expected_seed in zip(market.initial_clusters, expected["initial_clusters"]):
        assert seed["core_impurities"] == expected_seed["core_impurities"]
        assert seed["impurities"] == expected_seed["impurities_inside"]
        assert seed["wallet"] == pytest.approx(expected_seed["wallet"], rel=1e-12)

    assert len(market.events) == len(expected["events"])
    for number, (event, expected_event) in enumerate(zip(market.events, expected["events"])):
        for reference_key, key in REFERENCE_EVENT_KEYS.items():
            value, expected_value = event[key], expected_event[reference_key]
            if isinstance(expected_value, float):
                assert value == pytest.approx(expected_value, rel=1e-9), f"event {number} {key}"
            else:
                assert value == expected_value, f"event {number} {key}"

    assert len(market.clusters) == len(expected["clusters"])
    for cluster, expected_cluster in zip(market.clusters, expected["clusters"]):
        assert cluster.core_impurities == expected_cluster["core_impurities"]
        assert cluster.impurities == expected_cluster["impurities_inside"]
        assert cluster.wallet == pytest.approx(expected_cluster["wallet"], rel=1e-9)
        assert list(cluster.order_keys) == [key["name"] for key in expected_cluster["order_keys"]]
        for key in expected_cluster["order_keys"]:
            assert cluster.order_keys[key["name"]] == pytest.approx(key["score"], rel=1e-9, abs=1e-9), key["name"]
    assert [cluster.name for cluster in market.clusters] == [f"color_{v}" for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]


def test_default_differs_from_reference_on_scan(reference_dir):
    arrays = np.load(reference_dir / "scan1tag-47.npz")
    reference = aa.run_market_clustering(arrays["imp_boxes"], arrays["areas"], arrays["spatial_k50"], reference=True)
    default = aa.run_market_clustering(arrays["imp_boxes"], arrays["areas"], arrays["spatial_k50"])

    assert default.converged
    assert len(default.events) > len(reference.events)
    # The first pass is the same, because every cluster has only its seed.
    assert default.events[:10] == reference.events[:10]
