"""Group anomalous impurities into anomalous areas by market clustering.

Every impurity with a positive anomaly score takes part. The k highest
scoring impurities seed k clusters, each with a wallet that grows with the
score of its seed. Clusters then buy nearby impurities, which costs more
with distance and less with high scores, and merge when one buys the seed
(a core impurity) of another. The final clusters are scored with several
order keys, ranked across scans, plotted and printed.

Market rules (scores ``s`` in 0..1, box distance ``d`` in px between padded
boxes, see :func:`spatial_anomaly.box_distances`):

* wallet of a seed: ``exp(28 * sqrt(s))``;
* price for outside impurity ``o`` to join at member ``m``:
  ``exp(1.7 * sqrt(d)) * (1 - sqrt(0.95 s_o) * sqrt(0.95 s_m))**1.6``;
* when ``o`` is a core impurity of another cluster, the price is multiplied
  by ``(1 - (0.95 s_o)**0.05 * (0.95 s_m)**0.05)**2.5 * (2 - |s_o - s_m|)**8``
  and buying it merges the two clusters without payment;
* auction: every impurity stores the wallet of the cluster that last won it
  (before that cluster paid), and a cluster may bid only for impurities with
  no stored wallet or a stored wallet smaller than its own current wallet.

Differences from the reference implementation of MLography, which
``reference=True`` reproduces:

* Pricing. The reference prices an outside impurity only against the first
  core impurity of a cluster, because its search over members returns
  after the first member, although its docstring promises the cheapest
  member. By default the price is the minimum over all members, so a
  cluster grows along its members instead of only around its first seed.
* Stopping. The reference stops when the last cluster of a pass (the one
  with the smallest wallet) cannot expand, even if other clusters still
  could. By default clustering stops after a pass in which no cluster
  changed.

NOTE: on 8 published scans (min_threshold 30, spatial_k50 scores, k=10)
the default mode ended with a single cluster that contains every scoring
impurity. Priced against the nearest member, every purchase stays cheap,
and a cluster with nothing cheaper left merges another for free. The
reference mode left 2 to 9 clusters on the same scans.
"""

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

import atomic_io
import score_plots
from impurity_extract import FIRST_IMPURITY_LABEL
from spatial_anomaly import box_distances

logger = logging.getLogger(__name__)

#: Number of seed clusters when the caller does not choose.
DEFAULT_K = 10

#: Wallet of a seed with score s: exp(WALLET_RATE * sqrt(s)).
WALLET_RATE = 28.0

#: Price factor exp(DISTANCE_RATE * sqrt(d)) for box distance d in px.
DISTANCE_RATE = 1.7

#: Scores are scaled by this factor inside every price term.
SCORE_SCALE = 0.95

#: Exponent of the score term (1 - sqrt(.95 s_o) sqrt(.95 s_m)).
SCORE_TERM_POWER = 1.6

#: Root and exponent of the merge discount (1 - (.95 s_o)^0.05 (.95 s_m)^0.05)^2.5.
MERGE_DISCOUNT_ROOT = 0.05
MERGE_DISCOUNT_POWER = 2.5

#: Merge penalty (2 - |s_o - s_m|)^8.
MERGE_PENALTY_BASE = 2.0
MERGE_PENALTY_POWER = 8

#: Expansion statuses, as the reference implementation numbers them.
STATUS_NO_CHANGE = 0
STATUS_BOUGHT = 1
STATUS_MERGED = 2

#: Safety net: at most this many expansion attempts per scoring impurity.
#: NOTE: chosen as a generous bound, not tuned. Converged runs on 8
#: published scans needed at most 1.5 attempts per impurity.
MAX_ATTEMPTS_PER_IMPURITY = 100

#: Order keys of a cluster, in the order they are stored and reported.
ORDER_KEYS = (
    "median",
    "mean",
    "sum",
    "amount",
    "areas_sum",
    "diameter",
    "amount_div_diameter",
    "amount_mult_diameter",
    "sum_div_diameter",
    "area_sum_div_diameter",
    "area_sum_mult_diameter",
    "weighted_area_sum_mult_diameter",
    "weighted_area_sum_mult_diameter_mult_amount",
    "weighted_area2_sum_mult_diameter",
    "weighted_area2_sum_mult_diameter_mult_amount",
)

#: Order key that sorts the clusters of one scan and names them.
SCAN_ORDER_KEY = "weighted_area_sum_mult_diameter_mult_amount"

#: Value of a ratio order key when the diameter is 0.
UNDEFINED_RATIO = -1

#: Rows per chunk when a pairwise distance matrix could be large.
CHUNK_ROWS = 1024

#: Decile labels of normalised scores, lowest first.
DECILE_LABELS = tuple(f"{10 * i}%-{10 * (i + 1)}%" for i in range(10))

#: Columns of the rows that :func:`order_rows` returns.
ORDER_ROW_COLUMNS = ("scan", "rank", "cluster", "score", "norm_score", "decile")


@dataclass
class AnomalyCluster:
    """An anomalous area: a group of impurities found by market clustering.

    Attributes
    ----------
    name : str
        ``color_<position>`` with the cluster's position in its scan, from
        0 (lowest :data:`SCAN_ORDER_KEY`) to 1. The value is also its
        colour on the jet colour map in the plot.
    core_impurities : list of int
        Ids of the seeds in the cluster: its own seed first, then the seeds
        of the clusters it merged, in merge order.
    impurities : list of int
        Ids of all members, in the order they joined.
    wallet : float
        Money left at the end of clustering.
    order_keys : dict of str to float or int
        Cluster scores, keyed and ordered as :data:`ORDER_KEYS`.
    """

    name: str
    core_impurities: list
    impurities: list
    wallet: float
    order_keys: dict = field(default_factory=dict)


@dataclass
class MarketRun:
    """Full record of one market clustering run.

    Attributes
    ----------
    clusters : list of AnomalyCluster
        Final clusters, sorted by :data:`SCAN_ORDER_KEY` ascending.
    initial_clusters : list of dict
        Seed clusters before any expansion, largest wallet first, each with
        ``core_impurities``, ``impurities`` and ``wallet``.
    events : list of dict
        Every expansion attempt in order, with these keys:

        * ``cluster_first_core``: id of the bidding cluster's first core
          impurity, which identifies the cluster;
        * ``impurity``: the cheapest eligible outside impurity, or None
          when there is none;
        * ``cheapest_member``: the member that sets the price, or None;
        * ``price``: the price, or None;
        * ``holder_cores``: core ids of the cluster that held the
          impurity, or None when no cluster held it;
        * ``status``: 0 no change, 1 bought, 2 merged;
        * ``wallet_after``: the bidder's wallet after the attempt.
    converged : bool
        False when the attempt cap stopped the clustering.
    """

    clusters: list
    initial_clusters: list
    events: list
    converged: bool


@dataclass(eq=False)
class _Cluster:
    """Working state of one cluster, with impurities as market positions."""

    uid: int
    cores: list
    members: list
    wallet: float
    # Per market position: lowest plain price and lowest merge price over
    # the priced members, and the member that sets each.
    plain_price: np.ndarray
    plain_member: np.ndarray
    merge_price: np.ndarray
    merge_member: np.ndarray


class _Market:
    """Market of the scoring impurities, at positions ordered by score then id."""

    def __init__(self, boxes, scores, participant_ids, reference):
        self.ids = participant_ids
        self.scores = scores[participant_ids]
        self.boxes = boxes[participant_ids]
        self.reference = reference

        scaled = SCORE_SCALE * self.scores
        self.score_root = np.sqrt(scaled)
        self.merge_root = scaled**MERGE_DISCOUNT_ROOT

        size = len(participant_ids)
        self.holder = np.full(size, -1, dtype=np.int64)
        self.is_core = np.zeros(size, dtype=bool)
        self.stored_wallet = np.full(size, np.nan)
        self.clusters = {}
        self.ranking = []
        self.events = []

    def pair_prices(self, members, targets):
        """Return the plain and merge prices, shape (members, targets)."""
        distances = box_distances(self.boxes[members], self.boxes[targets])
        plain = np.exp(DISTANCE_RATE * np.sqrt(distances))
        plain *= (1.0 - self.score_root[members, None] * self.score_root[None, targets]) ** SCORE_TERM_POWER

        discount = (1.0 - self.merge_root[members, None] * self.merge_root[None, targets]) ** MERGE_DISCOUNT_POWER
        penalty = (MERGE_PENALTY_BASE - np.abs(self.scores[members, None] - self.scores[None, targets])) ** MERGE_PENALTY_POWER
        return plain, plain * discount * penalty

    def add_seed(self, position):
        everyone = np.arange(len(self.ids))
        plain, merge = self.pair_prices(np.array([position]), everyone)
        cluster = _Cluster(
            uid=len(self.ranking),
            cores=[position],
            members=[position],
            wallet=float(np.exp(WALLET_RATE * np.sqrt(self.scores[position]))),
            plain_price=plain[0],
            plain_member=np.full(len(self.ids), position, dtype=np.int64),
            merge_price=merge[0],
            merge_member=np.full(len(self.ids), position, dtype=np.int64),
        )
        self.clusters[cluster.uid] = cluster
        self.ranking.append(cluster)
        self.holder[position] = cluster.uid
        self.is_core[position] = True

    def price_new_member(self, cluster, member):
        # Reference mode prices against the first core only, which never changes.
        if self.reference:
            return
        plain, merge = self.pair_prices(np.array([member]), np.arange(len(self.ids)))
        # A strict comparison keeps the earlier member on ties.
        cheaper = plain[0] < cluster.plain_price
        cluster.plain_price[cheaper] = plain[0][cheaper]
        cluster.plain_member[cheaper] = member
        cheaper = merge[0] < cluster.merge_price
        cluster.merge_price[cheaper] = merge[0][cheaper]
        cluster.merge_member[cheaper] = member

    def reprice_without(self, cluster, member):
        """Recompute the prices that ``member``, which just left, had set."""
        if self.reference:
            return
        stale = np.flatnonzero((cluster.plain_member == member) | (cluster.merge_member == member))
        members = np.array(cluster.members)
        columns = max(1, CHUNK_ROWS * CHUNK_ROWS // len(members))

        for start in range(0, len(stale), columns):
            targets = stale[start : start + columns]
            plain, merge = self.pair_prices(members, targets)
            # argmin returns the first minimum, that is the earliest member.
            best = plain.argmin(axis=0)
            cluster.plain_price[targets] = plain[best, np.arange(len(targets))]
            cluster.plain_member[targets] = members[best]
            best = merge.argmin(axis=0)
            cluster.merge_price[targets] = merge[best, np.arange(len(targets))]
            cluster.merge_member[targets] = members[best]

    def expand(self, cluster):
        """Make one expansion attempt for ``cluster`` and return its status."""
        outside = self.holder != cluster.uid
        no_stored_wallet = np.isnan(self.stored_wallet)
        eligible = outside & (no_stored_wallet | (self.stored_wallet < cluster.wallet))
        core_of_other = self.is_core & outside

        prices = np.where(core_of_other, cluster.merge_price, cluster.plain_price)
        prices[~eligible] = np.inf
        # Positions run by score, then id, so argmin breaks ties that way.
        target = int(np.argmin(prices))
        price = float(prices[target])

        if not np.isfinite(price):
            self._record_event(cluster, None, None, None, None, STATUS_NO_CHANGE)
            return STATUS_NO_CHANGE

        merging = bool(core_of_other[target])
        if merging:
            cheapest_member = int(cluster.merge_member[target])
        else:
            cheapest_member = int(cluster.plain_member[target])
        holder = self.clusters.get(int(self.holder[target]))
        holder_cores = None if holder is None else [int(self.ids[p]) for p in holder.cores]

        if merging:
            self._merge(cluster, holder, target)
            status = STATUS_MERGED
        elif cluster.wallet >= price:
            self._buy(cluster, holder, target, price)
            status = STATUS_BOUGHT
        else:
            status = STATUS_NO_CHANGE

        self._record_event(cluster, target, cheapest_member, price, holder_cores, status)
        return status

    def _merge(self, cluster, absorbed, core):
        self.stored_wallet[core] = cluster.wallet
        cluster.wallet += absorbed.wallet
        cluster.cores.extend(absorbed.cores)
        cluster.members.extend(absorbed.members)
        self.holder[absorbed.members] = cluster.uid

        if not self.reference:
            # The absorbed members come later, so the bidder keeps ties.
            cheaper = absorbed.plain_price < cluster.plain_price
            cluster.plain_price[cheaper] = absorbed.plain_price[cheaper]
            cluster.plain_member[cheaper] = absorbed.plain_member[cheaper]
            cheaper = absorbed.merge_price < cluster.merge_price
            cluster.merge_price[cheaper] = absorbed.merge_price[cheaper]
            cluster.merge_member[cheaper] = absorbed.merge_member[cheaper]

        del self.clusters[absorbed.uid]
        self.ranking.remove(absorbed)

    def _buy(self, cluster, holder, target, price):
        self.stored_wallet[target] = cluster.wallet
        cluster.wallet -= price
        if holder is not None:
            holder.members.remove(target)
            self.reprice_without(holder, target)
        self.holder[target] = cluster.uid
        cluster.members.append(target)
        self.price_new_member(cluster, target)

    def _record_event(self, cluster, target, cheapest_member, price, holder_cores, status):
        self.events.append(
            {
                "cluster_first_core": int(self.ids[cluster.cores[0]]),
                "impurity": None if target is None else int(self.ids[target]),
                "cheapest_member": None if cheapest_member is None else int(self.ids[cheapest_member]),
                "price": price,
                "holder_cores": holder_cores,
                "status": status,
                "wallet_after": float(cluster.wallet),
            }
        )

    def snapshot(self):
        """Return the clusters as plain dicts in ranking order, ids not positions."""
        return [
            {
                "core_impurities": [int(self.ids[p]) for p in cluster.cores],
                "impurities": [int(self.ids[p]) for p in cluster.members],
                "wallet": float(cluster.wallet),
            }
            for cluster in self.ranking
        ]


def _validate_market_inputs(boxes, areas, scores, k):
    boxes = np.asarray(boxes, dtype=np.float64)
    areas = np.asarray(areas)
    scores = np.asarray(scores, dtype=np.float64)

    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {boxes.shape}")
    if areas.shape != (len(boxes),):
        raise ValueError(f"areas must have shape ({len(boxes)},) to match boxes, got {areas.shape}")
    if scores.shape != (len(boxes),):
        raise ValueError(f"scores must have shape ({len(boxes)},) to match boxes, got {scores.shape}")
    if np.any(~np.isfinite(scores) | (scores < 0) | (scores > 1)):
        bad = scores[~np.isfinite(scores) | (scores < 0) | (scores > 1)][0]
        raise ValueError(
            f"scores must lie in 0..1 because the market prices are undefined outside it, got {bad!r}; "
            "rescale the anomaly scores first"
        )
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer number of clusters, got {k!r}")
    return boxes, areas, scores, int(k)


def run_market_clustering(boxes, areas, scores, k=DEFAULT_K, reference=False, max_attempts=None):
    """Cluster the scoring impurities of one scan and record every step.

    Impurities with a score > 0 take part, ordered by score ascending and
    then by id. Cluster c = 0..k-1 starts from the (c+1)-th highest scorer.
    Each pass visits the clusters by wallet, largest first (a stable sort,
    so equal wallets keep their previous order), and makes one expansion
    attempt per cluster: the cheapest eligible outside impurity is merged
    when it is a core impurity of another cluster, bought when the wallet
    covers the price (wallet >= price), and otherwise left alone. A merge
    removes the absorbed cluster and starts a new pass at once.

    Ties in price go to the lower-scoring outside impurity, then the lower
    id, and then to the member that joined first.

    Parameters
    ----------
    boxes : (n, 4) array_like
        Padded boxes ``(rmin - 1, rmax + 1, cmin - 1, cmax + 1)`` in px,
        indexed by impurity id.
    areas : (n,) array_like
        Impurity areas in px^2.
    scores : (n,) array_like
        Anomaly score of each impurity id, in 0..1.
    k : int
        Number of seed clusters. With fewer scoring impurities, one cluster
        per scoring impurity is used and a warning is logged.
    reference : bool
        Reproduce the reference implementation: price only against the
        first core impurity and stop when the last cluster of a pass cannot
        expand (see the module docstring).
    max_attempts : int, optional
        Cap on expansion attempts, by default
        :data:`MAX_ATTEMPTS_PER_IMPURITY` times the scoring impurities.
        Reaching it logs a warning and returns the clusters as they are.

    Returns
    -------
    MarketRun
        The final clusters with their order keys and names, the seed
        clusters and every expansion event.

    Raises
    ------
    ValueError
        If the shapes disagree, a score lies outside 0..1 or k is not a
        positive integer.
    """
    boxes, areas, scores, k = _validate_market_inputs(boxes, areas, scores, k)

    candidates = np.flatnonzero(scores > 0)
    participant_ids = candidates[np.lexsort((candidates, scores[candidates]))]
    if len(participant_ids) == 0:
        logger.info("no impurity has a positive anomaly score: no clusters")
        return MarketRun(clusters=[], initial_clusters=[], events=[], converged=True)

    used_k = k
    if len(participant_ids) < k:
        used_k = len(participant_ids)
        logger.warning(
            "market clustering: k=%d initial clusters requested, but only %d impurities have a positive "
            "score, so k=%d is used",
            k,
            len(participant_ids),
            used_k,
        )
    if max_attempts is None:
        max_attempts = MAX_ATTEMPTS_PER_IMPURITY * len(participant_ids)

    market = _Market(boxes, scores, participant_ids, reference)
    for c in range(used_k):
        market.add_seed(len(participant_ids) - 1 - c)
    initial_clusters = market.snapshot()

    converged = _run_passes(market, max_attempts)
    clusters = _finish_clusters(market, boxes, areas, scores)
    return MarketRun(clusters=clusters, initial_clusters=initial_clusters, events=market.events, converged=converged)


def _run_passes(market, max_attempts):
    """Run passes until the stopping rule holds; return False if the cap stopped them."""
    attempts = 0
    while True:
        market.ranking.sort(key=lambda cluster: -cluster.wallet)
        changed = False
        status = STATUS_NO_CHANGE

        for cluster in list(market.ranking):
            if attempts >= max_attempts:
                logger.warning(
                    "market clustering stopped after %d expansion attempts without converging; "
                    "the clusters are those reached so far",
                    attempts,
                )
                return False
            status = market.expand(cluster)
            attempts += 1
            changed = changed or status != STATUS_NO_CHANGE
            if status == STATUS_MERGED:
                break

        if status == STATUS_MERGED:
            continue
        if market.reference:
            # The reference checks only the status of the last cluster of the pass.
            if status == STATUS_NO_CHANGE:
                return True
        elif not changed:
            return True


def _finish_clusters(market, boxes, areas, scores):
    """Score, sort and name the final clusters."""
    clusters = []
    for working in market.ranking:
        impurities = [int(market.ids[p]) for p in working.members]
        clusters.append(
            AnomalyCluster(
                name="",
                core_impurities=[int(market.ids[p]) for p in working.cores],
                impurities=impurities,
                wallet=float(working.wallet),
                order_keys=cluster_order_keys(impurities, boxes, areas, scores),
            )
        )

    # A stable sort: equal keys keep the order of the last pass.
    clusters.sort(key=lambda cluster: cluster.order_keys[SCAN_ORDER_KEY])
    for position, cluster in enumerate(clusters):
        cluster.name = cluster_name(position, len(clusters))
    return clusters


def market_clustering(boxes, areas, scores, k=DEFAULT_K, reference=False):
    """Cluster the scoring impurities of one scan into anomalous areas.

    See :func:`run_market_clustering`, which also returns the seeds and
    every expansion event.

    Returns
    -------
    list of AnomalyCluster
        Clusters sorted by :data:`SCAN_ORDER_KEY` ascending, or an empty list
        when no impurity has a positive score.
    """
    return run_market_clustering(boxes, areas, scores, k=k, reference=reference).clusters


def cluster_diameter(boxes):
    """Return the largest box distance in px between two of the boxes, 0 for one box."""
    boxes = np.asarray(boxes, dtype=np.float64)
    diameter = 0.0
    for start in range(0, len(boxes), CHUNK_ROWS):
        diameter = max(diameter, float(box_distances(boxes[start : start + CHUNK_ROWS], boxes).max()))
    return diameter


def cluster_order_keys(impurity_ids, boxes, areas, scores):
    """Compute the order keys of one cluster.

    With s the member scores, A their areas in px^2, n the member count
    and D the diameter in px (:func:`cluster_diameter`): ``median``,
    ``mean`` and ``sum`` of s; ``amount`` = n; ``areas_sum`` = sum(A);
    ``diameter`` = D; ``amount_div_diameter`` = n / D,
    ``amount_mult_diameter`` = n * D, ``sum_div_diameter`` = sum(s) / D,
    ``area_sum_div_diameter`` = sum(A) / D, ``area_sum_mult_diameter`` =
    sum(A) * D, ``weighted_area_sum_mult_diameter`` = sum(s * A) * D, the
    same times n, ``weighted_area2_sum_mult_diameter`` = sum(s * A^2) * D,
    and the same times n. The four ratios are -1 when D is 0. Sums are
    exactly rounded (:func:`math.fsum`).

    Returns
    -------
    dict of str to float or int
        Keys in the order of :data:`ORDER_KEYS`. ``amount`` is an int, and
        so is ``areas_sum`` when the areas are integers.
    """
    ids = np.asarray(impurity_ids, dtype=np.int64)
    if ids.size == 0:
        raise ValueError("a cluster must have at least one impurity")
    areas = np.asarray(areas)
    member_scores = np.asarray(scores, dtype=np.float64)[ids]
    member_areas = areas[ids].astype(np.float64)

    amount = len(ids)
    score_sum = math.fsum(member_scores)
    if np.issubdtype(areas.dtype, np.integer):
        area_sum = int(areas[ids].sum())
    else:
        area_sum = math.fsum(member_areas)
    diameter = cluster_diameter(np.asarray(boxes, dtype=np.float64)[ids])
    weighted_area = math.fsum(member_scores * member_areas)
    weighted_area2 = math.fsum(member_scores * member_areas * member_areas)

    def ratio(numerator):
        return numerator / diameter if diameter != 0 else UNDEFINED_RATIO

    keys = {
        "median": float(np.median(member_scores)),
        "mean": score_sum / amount,
        "sum": score_sum,
        "amount": amount,
        "areas_sum": area_sum,
        "diameter": diameter,
        "amount_div_diameter": ratio(amount),
        "amount_mult_diameter": amount * diameter,
        "sum_div_diameter": ratio(score_sum),
        "area_sum_div_diameter": ratio(area_sum),
        "area_sum_mult_diameter": area_sum * diameter,
        "weighted_area_sum_mult_diameter": weighted_area * diameter,
        "weighted_area_sum_mult_diameter_mult_amount": weighted_area * diameter * amount,
        "weighted_area2_sum_mult_diameter": weighted_area2 * diameter,
        "weighted_area2_sum_mult_diameter_mult_amount": weighted_area2 * diameter * amount,
    }
    return keys


def cluster_position(position, count):
    """Return the colour value 0..1 of the cluster at ``position`` of ``count``, or 1 when alone."""
    if count == 1:
        return 1.0
    return position / (count - 1)


def cluster_name(position, count):
    """Name the cluster at ``position`` of ``count``: ``color_0.0`` .. ``color_1.0``, or ``color_1`` when alone.

    The value is rounded to 3 decimals and printed as Python prints a
    float, so the names match those of the reference implementation.
    """
    if count == 1:
        return "color_1"
    return f"color_{round(position / (count - 1), 3)}"


def _plain_number(value, label):
    """Convert a numpy or Python number to int or float, rejecting NaN and infinity."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{label} must be a number, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{label} must be finite to be stored as JSON, got {number!r}")
    return number


def clusters_log_entry(scan_name, plot_path, clusters, scores):
    """Build the clusters-log entry of one scan, with plain JSON values only.

    Parameters
    ----------
    scan_name : str
        Scan file name, which identifies the entry in the log.
    plot_path : str
        Path of the scan's area-anomaly plot.
    clusters : list of AnomalyCluster
        Final clusters of the scan in their order.
    scores : (n,) array_like
        Anomaly score of each impurity id.

    Returns
    -------
    dict
        ``{"scan_name", "plot_path", "clusters": [{"cluster_name",
        "order_keys": [{"name", "score"}], "core_impurities",
        "impurities": [{"id", "score"}]}]}``.

    Raises
    ------
    ValueError
        If a score or order key is NaN or infinite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    entry_clusters = []
    for cluster in clusters:
        entry_clusters.append(
            {
                "cluster_name": cluster.name,
                "order_keys": [
                    {"name": name, "score": _plain_number(value, f"order key {name} of {cluster.name}")}
                    for name, value in cluster.order_keys.items()
                ],
                "core_impurities": [int(i) for i in cluster.core_impurities],
                "impurities": [
                    {"id": int(i), "score": _plain_number(scores[i], f"score of impurity {i}")}
                    for i in cluster.impurities
                ],
            }
        )
    return {"scan_name": str(scan_name), "plot_path": os.fspath(plot_path), "clusters": entry_clusters}


def read_clusters_log(log_path):
    """Read the clusters log, a JSON list of scan entries, or [] when it does not exist.

    Raises
    ------
    ValueError
        If the file is not valid JSON or not a list of entries with a
        string ``scan_name`` and a list of clusters. The message names the
        file.
    """
    entries = atomic_io.read_json(log_path, default=[])
    if not isinstance(entries, list) or not all(_is_log_entry(entry) for entry in entries):
        raise ValueError(
            f"{os.fspath(log_path)} is not a clusters log (a JSON list of scan entries with a scan_name); "
            "restore it from a backup or delete it to start over"
        )
    return entries


def _is_log_entry(entry):
    if not isinstance(entry, dict) or not isinstance(entry.get("scan_name"), str):
        return False
    clusters = entry.get("clusters", [])
    return isinstance(clusters, list) and all(isinstance(cluster, dict) for cluster in clusters)


def update_clusters_log(log_path, entry, lock=True):
    """Store one scan's entry in the clusters log, replacing an entry of the same scan.

    The read, update and atomic write happen under
    :func:`atomic_io.folder_lock` of the log's folder, so parallel runs do
    not lose each other's entries. Pass ``lock=False`` when the caller
    already holds that lock, because the lock is not re-entrant.

    Raises
    ------
    ValueError
        If the existing log is corrupt. The message names the file.
    atomic_io.LockTimeout
        If another run holds the folder lock for too long.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(log_path)))
    if not lock:
        _replace_log_entry(log_path, entry)
        return
    with atomic_io.folder_lock(folder):
        _replace_log_entry(log_path, entry)


def _replace_log_entry(log_path, entry):
    entries = read_clusters_log(log_path)
    for i, existing in enumerate(entries):
        if existing["scan_name"] == entry["scan_name"]:
            entries[i] = entry
            break
    else:
        entries.append(entry)
    atomic_io.write_json_list(log_path, entries)


def _order_key_score(entry, cluster, key):
    for order_key in cluster.get("order_keys", []):
        if order_key.get("name") == key:
            return float(order_key["score"])
    raise ValueError(
        f"cluster {cluster.get('cluster_name')!r} of scan {entry.get('scan_name')!r} has no order key {key!r}; "
        "rerun the area anomaly for that scan"
    )


def _min_max(values):
    """Min-max normalise to 0..1, mapping constant values to 0."""
    if values.size == 0:
        return values
    low = values.min()
    span = values.max() - low
    if span == 0 or not np.isfinite(span):
        return np.zeros_like(values)
    return (values - low) / span


def _decile_index(norm_score, lowers):
    """Index of the decile [lower, next lower) that contains the score; the last is closed."""
    return int(np.clip(np.searchsorted(lowers, norm_score, side="right") - 1, 0, len(lowers) - 1))


def order_clusters(log_entries):
    """Rank the clusters of all scans in the log by each order key.

    For every key of :data:`ORDER_KEYS`, the clusters are sorted by score
    descending (equal scores keep log order) and min-max normalised into
    ``norm_score`` (all 0 when the scores are equal). The decile
    boundaries are the 0th, 10th, .., 100th percentiles of ``norm_score``
    (linear interpolation). A cluster lies in the decile with
    ``lower <= norm_score < upper``, except that the top decile includes
    its upper bound. When boundaries coincide because of equal scores,
    those clusters fall into the highest decile whose lower bound equals
    their score.

    Parameters
    ----------
    log_entries : list of dict
        Entries as :func:`clusters_log_entry` builds them.

    Returns
    -------
    dict
        ``{"scan_names": [...], "order_keys": [{"key_name",
        "sorted_clusters": [{"rank", "scan_name", "plot_path",
        "cluster_name", "score", "norm_score", "decile"}], "deciles":
        [{"range", "lower", "upper"}]}]}``, ready for JSON. Ranks start at
        1. ``deciles`` is empty when the log has no clusters.

    Raises
    ------
    ValueError
        If a cluster lacks one of the order keys.
    """
    ordered_keys = []
    for key in ORDER_KEYS:
        items = [(entry, cluster) for entry in log_entries for cluster in entry.get("clusters", [])]
        scores = np.array([_order_key_score(entry, cluster, key) for entry, cluster in items], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        norm_scores = _min_max(scores[order])

        deciles = []
        lowers = np.empty(0)
        if norm_scores.size:
            boundaries = np.percentile(norm_scores, np.arange(0, 101, 10))
            lowers = boundaries[:-1]
            deciles = [
                {"range": label, "lower": float(boundaries[i]), "upper": float(boundaries[i + 1])}
                for i, label in enumerate(DECILE_LABELS)
            ]

        sorted_clusters = []
        for rank, (index, norm_score) in enumerate(zip(order, norm_scores), start=1):
            entry, cluster = items[index]
            sorted_clusters.append(
                {
                    "rank": rank,
                    "scan_name": entry["scan_name"],
                    "plot_path": entry.get("plot_path"),
                    "cluster_name": cluster["cluster_name"],
                    "score": _plain_number(scores[index], f"{key} of {cluster['cluster_name']}"),
                    "norm_score": float(norm_score),
                    "decile": DECILE_LABELS[_decile_index(norm_score, lowers)],
                }
            )
        ordered_keys.append({"key_name": key, "sorted_clusters": sorted_clusters, "deciles": deciles})

    return {"scan_names": [entry["scan_name"] for entry in log_entries], "order_keys": ordered_keys}


def write_ordered(ordered, path):
    """Write the output of :func:`order_clusters` to ``path`` as JSON, atomically."""
    atomic_io.write_json(path, ordered)


def _ordered_key(ordered, key):
    for ordered_key in ordered["order_keys"]:
        if ordered_key["key_name"] == key:
            return ordered_key
    raise ValueError(f"unknown order key {key!r}; choose one of {', '.join(ORDER_KEYS)}")


def order_rows(ordered, scan_names, key):
    """Return the ranking rows of some scans for one order key.

    Parameters
    ----------
    ordered : dict
        Output of :func:`order_clusters`.
    scan_names : list of str or None
        Scans to include, or None for every scan.
    key : str
        One of :data:`ORDER_KEYS`.

    Returns
    -------
    list of dict
        One row per cluster, best rank first, with the keys of
        :data:`ORDER_ROW_COLUMNS`. The rank is over all scans of the log.

    Raises
    ------
    ValueError
        If the key is unknown or a scan is not in the log.
    """
    ordered_key = _ordered_key(ordered, key)
    if scan_names is not None:
        missing = [name for name in scan_names if name not in ordered["scan_names"]]
        if missing:
            raise ValueError(
                f"scans not in the clusters log: {', '.join(missing)}; run the area anomaly on them first"
            )
        requested = set(scan_names)

    rows = []
    for cluster in ordered_key["sorted_clusters"]:
        if scan_names is not None and cluster["scan_name"] not in requested:
            continue
        rows.append(
            {
                "scan": cluster["scan_name"],
                "rank": cluster["rank"],
                "cluster": cluster["cluster_name"],
                "score": cluster["score"],
                "norm_score": cluster["norm_score"],
                "decile": cluster["decile"],
            }
        )
    return rows


def format_order_table(rows):
    """Format ranking rows as a console table; numbers show 6 significant digits.

    :func:`write_order_csv` keeps full precision.
    """
    header = list(ORDER_ROW_COLUMNS)
    cells = [
        [
            str(row["scan"]),
            str(row["rank"]),
            str(row["cluster"]),
            f"{row['score']:.6g}",
            f"{row['norm_score']:.6g}",
            str(row["decile"]),
        ]
        for row in rows
    ]
    widths = [max(len(text) for text in column) for column in zip(header, *cells)]
    # Text columns align left and numeric columns align right.
    numeric = [False, True, False, True, True, False]

    def format_line(texts):
        parts = [text.rjust(width) if right else text.ljust(width) for text, width, right in zip(texts, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [format_line(header), format_line(["-" * width for width in widths])]
    lines.extend(format_line(texts) for texts in cells)
    return "\n".join(lines)


def write_order_csv(rows, path):
    """Write ranking rows to ``path`` as CSV atomically, with full float precision."""
    import pandas as pd

    atomic_io.write_csv(path, pd.DataFrame(rows, columns=list(ORDER_ROW_COLUMNS)))


#: Width in px of the scan plots saved for the top-ranked clusters.
TOP_PLOT_WIDTH_PX = 1200

#: Height in px of the title strip above a top-ranked plot.
TOP_PLOT_TITLE_PX = 40



def area_anomaly_image(markers, indices, clusters):
    """Colour a label image: clusters by jet, other significant impurities black, the rest white.

    Parameters
    ----------
    markers : (H, W) int array_like
        Watershed labels: -1 on boundaries, 1 on the background, ``id + 2``
        on impurity ``id``.
    indices : array_like of int
        Ids of the significant impurities.
    clusters : list of AnomalyCluster
        Clusters in their final order. The cluster at position i of n gets
        the jet colour of :func:`cluster_position`.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        RGB image.
    """
    from matplotlib import colormaps

    markers = np.asarray(markers)
    indices = np.asarray(indices, dtype=np.int64)
    member_ids = [np.asarray(cluster.impurities, dtype=np.int64) for cluster in clusters]
    if markers.size and markers.min() < -1:
        raise ValueError(f"markers must be -1 or larger, got {markers.min()}")

    # A lookup table over labels: entry label + 1, so that boundary label -1 is entry 0.
    largest_label = int(markers.max()) if markers.size else FIRST_IMPURITY_LABEL - 1
    for ids in [indices, *member_ids]:
        if ids.size:
            largest_label = max(largest_label, int(ids.max()) + FIRST_IMPURITY_LABEL)
    table = np.full((largest_label + 2, 3), 255, dtype=np.uint8)
    table[indices + FIRST_IMPURITY_LABEL + 1] = 0

    jet = colormaps["jet"]
    for position, ids in enumerate(member_ids):
        rgb = np.array(jet(cluster_position(position, len(clusters)))[:3])
        table[ids + FIRST_IMPURITY_LABEL + 1] = np.round(rgb * 255).astype(np.uint8)

    return table[markers + 1]


def plot_area_anomaly(markers, indices, clusters, path, title="Area anomaly"):
    """Plot the anomalous areas of one scan and save the figure atomically.

    Cluster members take their cluster's jet colour, other significant
    impurities are black, and the background is white. The colour bar
    marks the value of each cluster, which is also in its name.

    Parameters
    ----------
    markers, indices, clusters
        See :func:`area_anomaly_image`.
    path : str or os.PathLike
        Output image, in the format that its extension names.
    title : str
        Figure title.
    """
    image = area_anomaly_image(markers, indices, clusters)
    ticks = [cluster_position(position, len(clusters)) for position in range(len(clusters))]

    figure = score_plots.draw_image_figure(
        image, title, colormap="jet", colorbar_label="cluster position", colorbar_ticks=ticks
    )
    score_plots.save_figure(path, figure)


def _decile_file_name(label):
    low, high = label.replace("%", "").split("-")
    return f"decile_{low}-{high}.png"


def plot_order_histograms(ordered, folder):
    """Save histograms of the normalised scores of every order key.

    Writes ``<folder>/<key>/all.png``, a histogram with a log-scale count
    axis, and ``<folder>/<key>/decile_<low>-<high>.png`` for every decile
    that contains a cluster. Keys without clusters get no files.

    Returns
    -------
    list of str
        Paths written.
    """
    written = []
    for ordered_key in ordered["order_keys"]:
        key = ordered_key["key_name"]
        clusters = ordered_key["sorted_clusters"]
        if not clusters:
            continue
        norm_scores = np.array([cluster["norm_score"] for cluster in clusters])
        key_folder = os.path.join(os.fspath(folder), key)

        path = os.path.join(key_folder, "all.png")
        _save_histogram(path, norm_scores, f"{key}: all clusters", log=True)
        written.append(path)

        for decile in ordered_key["deciles"]:
            in_decile = np.array([cluster["norm_score"] for cluster in clusters if cluster["decile"] == decile["range"]])
            if in_decile.size == 0:
                continue
            path = os.path.join(key_folder, _decile_file_name(decile["range"]))
            _save_histogram(path, in_decile, f"{key}: decile {decile['range']}", log=False)
            written.append(path)
    return written


def _save_histogram(path, values, title, log):
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.add_subplot()
    axes.hist(values, bins=10, log=log)
    axes.set_title(title)
    axes.set_xlabel("normalised score (0 lowest, 1 highest)")
    axes.set_ylabel("clusters (log scale)" if log else "clusters")
    score_plots.save_figure(path, figure)


def _read_scan_plot(path):
    """Read a saved scan plot shrunk to :data:`TOP_PLOT_WIDTH_PX` wide, or None if unreadable."""
    import cv2

    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    height, width = image.shape[:2]
    if width > TOP_PLOT_WIDTH_PX:
        new_height = max(1, round(height * TOP_PLOT_WIDTH_PX / width))
        image = cv2.resize(image, (TOP_PLOT_WIDTH_PX, new_height), interpolation=cv2.INTER_AREA)
    return image


def _add_title_strip(image, title):
    """Return the image below a white strip with ``title``, shrunk to fit the width."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = 0.8
    width = image.shape[1]
    (text_width, text_height), _ = cv2.getTextSize(title, font, scale, 1)
    if text_width > width - 20:
        scale *= (width - 20) / text_width
        (text_width, text_height), _ = cv2.getTextSize(title, font, scale, 1)

    strip = np.full((TOP_PLOT_TITLE_PX, width, 3), 255, dtype=np.uint8)
    origin = (max(0, (width - text_width) // 2), (TOP_PLOT_TITLE_PX + text_height) // 2)
    cv2.putText(strip, title, origin, font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([strip, image])


def save_top_ranked_plots(ordered, log_entries, folder, top=50):
    """Save the scan plot of each of the ``top`` best-ranked clusters of every order key.

    Writes ``<folder>/<key>/<rank>.png``: the scan's saved area-anomaly
    plot (from ``plot_path`` in the log), shrunk to
    :data:`TOP_PLOT_WIDTH_PX` wide, under a title with the key, rank,
    scan, cluster name and score. Each scan plot is read once. A plot that
    cannot be read is skipped with a logged warning.

    Returns
    -------
    list of str
        Paths written.
    """
    plot_paths = {entry["scan_name"]: entry.get("plot_path") for entry in log_entries}
    images = {}
    unreadable = set()
    written = []

    for ordered_key in ordered["order_keys"]:
        key = ordered_key["key_name"]
        for cluster in ordered_key["sorted_clusters"][:top]:
            plot_path = plot_paths.get(cluster["scan_name"]) or cluster.get("plot_path")
            if plot_path not in images:
                images[plot_path] = None if plot_path is None else _read_scan_plot(plot_path)
            image = images[plot_path]
            if image is None:
                if plot_path not in unreadable:
                    logger.warning(
                        "cannot read the area plot %s of scan %s; skipping its top-ranked plots",
                        plot_path,
                        cluster["scan_name"],
                    )
                    unreadable.add(plot_path)
                continue

            title = (
                f"{key} rank {cluster['rank']}: {cluster['scan_name']} "
                f"{cluster['cluster_name']} (score {cluster['score']:.6g})"
            )
            path = os.path.join(os.fspath(folder), key, f"{cluster['rank']}.png")
            atomic_io.write_png(path, _add_title_strip(image, title))
            written.append(path)
    return written
