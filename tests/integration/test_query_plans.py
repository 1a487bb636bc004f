"""How a batch loads its state, on a large collection in the real local server.

Every command the pipeline's client sends is recorded with pymongo's command monitoring (a
``CommandListener`` on a real ``MongoClient``). The tests assert, from those records:

* every read filter is an equality, ``$in`` or range on the leading fields of an index that
  ``index_information()`` lists (a sort must come from the same index); every write is keyed by
  ``_id``. ``$ne``, ``$regex``, ``$where``, ``$exists`` and an empty filter are refused;
* each photo read returns exactly what its filter selects in the generated data (counted in
  Python), and all of them together stay inside the batch's neighbourhood: the cells within
  the reach of the last round around the closure's photos, over the last round's time margin;
* the number of round trips has a stated bound (see ``read_round_trip_bound``);
* on a server with ``explain`` (a real MongoDB through ``MONGODB_URI``) every winning plan uses
  an index and none scans the collection; on a server without it, that it really answers
  "no such command" (code 59). The path taken is recorded as the test property ``explain``.

The local server has no ``explain`` and scans its documents for any query other than by
``_id``, so each neighbourhood query costs seconds on a large collection: the round-trip
bounds matter there too.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from bson.regex import Regex
from pymongo import MongoClient, monitoring
from pymongo.database import Database
from pymongo.errors import OperationFailure

from snapmap_pipeline.assets.backfill import day_photo_chunks
from snapmap_pipeline.clustering import (
    ClusterParams,
    PhotoPoint,
    SearchWindow,
    canonical_pass,
    closure,
    link_reach_m,
)
from snapmap_pipeline.store.events import (
    apply_pending_links,
    effective_links,
    event_fields,
    photos_linked_to,
    queue_links,
)
from snapmap_pipeline.store.geocell import cell_of, cells_near
from snapmap_pipeline.store.recluster import ReclusterReport, recluster
from snapmap_pipeline.store.schema import ensure_schema
from tests.conftest import stack_setting
from tests.engine.oracle import great_circle_m, oracle_pass

pytestmark = pytest.mark.storage

PARAMS = ClusterParams()
T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAYS = 30
# A festival city about 14 km by 13 km: Prayagraj.
LON_MIN, LON_SPAN, LAT_MIN, LAT_SPAN = 81.78, 0.14, 25.38, 0.12
BATCH_DAY = 10
BACKFILL_DAY = 17
# The loader's limits (store/recluster.py), restated here as the contract the bounds rely on.
IDS_PER_QUERY = 5_000
REPLY_DOCS = 10_000
BRANCHES_PER_QUERY = 200

_READS = {"find", "aggregate", "count", "distinct"}
_WRITES = {"update": "updates", "delete": "deletes"}
_HARMLESS = {"insert", "getMore", "endSessions", "killCursors"}
_RANGE = {"$gt", "$gte", "$lt", "$lte"}
_INDEX_STAGES = {"IXSCAN", "IDHACK", "EXPRESS_IXSCAN", "EXPRESS_IDHACK", "COUNT_SCAN"}


# ----------------------------------------------------------------------------- recording


@dataclass
class Command:
    """One command the client sent, with the ids of the documents its cursor returned."""

    name: str
    collection: str
    body: dict
    returned: list = field(default_factory=list)
    get_mores: int = 0
    ok: bool = False


class CommandLog(monitoring.CommandListener):
    """Every command a client sends (pymongo command monitoring), and what came back."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self._by_request: dict[int, Command] = {}
        self._by_cursor: dict[int, Command] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        body = dict(event.command)
        if event.command_name == "getMore":
            command = self._by_cursor[body["getMore"]]  # its replies belong to the read
            command.get_mores += 1
        else:
            collection = body.get(event.command_name)
            name = collection if isinstance(collection, str) else ""
            command = Command(event.command_name, name, body)
            self.commands.append(command)
        self._by_request[event.request_id] = command

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        command = self._by_request.pop(event.request_id)
        command.ok = True
        cursor = event.reply.get("cursor")
        if not cursor:
            return
        batch = cursor.get("firstBatch", cursor.get("nextBatch", []))
        command.returned.extend(doc.get("_id") for doc in batch)
        if cursor["id"]:
            self._by_cursor[cursor["id"]] = command

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._by_request.pop(event.request_id, None)

    def reads(self, collection: str | None = None) -> list[Command]:
        """The reads that succeeded (a read that failed on a network error is sent again by
        pymongo's retryable reads; :meth:`failures` counts those)."""
        return [
            c
            for c in self.commands
            if c.ok and c.name in _READS and (collection is None or c.collection == collection)
        ]

    def failures(self) -> int:
        return sum(1 for c in self.commands if not c.ok)

    def round_trips(self) -> int:
        return len(self.commands) + sum(c.get_mores for c in self.commands)


@dataclass
class Monitored:
    """A client whose every command is recorded, for the code under test, and a plain one on
    the same database for the test's own questions (indexes, explain)."""

    client: MongoClient
    db: Database
    log: CommandLog
    plain: MongoClient

    def close(self) -> None:
        self.client.close()
        self.plain.close()


def monitored(uri: str, database: str) -> Monitored:
    log = CommandLog()
    # The local server answers nothing else while it scans a large collection; on a busy
    # machine that can outlast the default 20 s heartbeat and reset the connections.
    options = {"tz_aware": True, "serverSelectionTimeoutMS": 30_000, "connectTimeoutMS": 60_000}
    client = MongoClient(uri, event_listeners=[log], **options)
    return Monitored(client, client[database], log, MongoClient(uri, **options))


# ------------------------------------------------------------------- filter shapes and plans


def read_filter(command: Command) -> tuple[dict, list[tuple[str, int]]]:
    """The filter and sort of a read command."""
    body = command.body
    if command.name == "find":
        return body.get("filter", {}), list((body.get("sort") or {}).items())
    if command.name == "aggregate":
        first = body["pipeline"][0] if body["pipeline"] else {}
        return first.get("$match", {}), []
    return body.get("query") or {}, []


def conjunctions(query: dict) -> list[dict[str, object]]:
    """``query`` as a list of conjunctions ``{field: condition}`` (its disjunctive normal
    form). Raises ``ValueError`` for anything that is not an equality, ``$in`` or range on a
    field, or ``$and``/``$or`` of those."""
    result: list[dict[str, object]] = [{}]
    for key, value in query.items():
        if key == "$and":
            parts = [conjunctions(part) for part in value]
        elif key == "$or":
            parts = [[branch for part in value for branch in conjunctions(part)]]
        elif key.startswith("$"):
            raise ValueError(f"operator {key} is not an indexed equality or range")
        else:
            check_condition(key, value)
            parts = [[{key: value}]]
        for options in parts:
            result = [_conjoin(left, right) for left in result for right in options]
    return result


def _conjoin(left: dict, right: dict) -> dict:
    merged = dict(left)
    for key, value in right.items():
        merged[key] = ("$and", merged[key], value) if key in merged else value
    return merged


def check_condition(field_name: str, value: object) -> None:
    if isinstance(value, Regex | re.Pattern):
        raise ValueError(f"regex on {field_name}")
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"empty condition on {field_name}")
        for operator in value:
            if operator not in _RANGE | {"$in", "$eq"}:
                raise ValueError(f"{operator} on {field_name} is not an equality or range")


def index_keys(db: Database, collection: str) -> list[list[str]]:
    """The key fields of each index of ``collection``, in order, as the server lists them."""
    return [[key for key, _ in spec["key"]] for spec in db[collection].index_information().values()]


def plan_problems(command: Command, indexes: list[list[str]]) -> list[str]:
    """Why a read could not be answered by index ranges alone (empty when it can)."""
    query, sort = read_filter(command)
    try:
        branches = conjunctions(query)
    except ValueError as error:
        return [f"{command.collection}: {error}: {query}"]
    problems = []
    fitting = [keys for keys in indexes if all(_leads(keys, b) for b in branches)]
    for branch in branches:
        if not branch:
            problems.append(f"{command.collection}: no predicate (collection scan): {query}")
        elif not any(_leads(keys, branch) for keys in indexes):
            problems.append(f"{command.collection}: no index leads with {sorted(branch)}: {query}")
    if sort:
        sort_keys = [key for key, _ in sort]
        if len({direction for _, direction in sort}) != 1 or not any(
            keys[: len(sort_keys)] == sort_keys for keys in fitting
        ):
            problems.append(f"{command.collection}: sort {sort} not served by the filter's index")
    return problems


def _leads(keys: list[str], branch: dict) -> bool:
    """Whether the fields of ``branch`` are exactly the first fields of index ``keys``."""
    return bool(branch) and set(keys[: len(branch)]) == set(branch)


def write_problems(command: Command) -> list[str]:
    """Writes must be keyed by ``_id`` (point updates, conditional on a version or holder)."""
    if command.name == "findAndModify":
        statements = [command.body.get("query", {})]
    else:
        statements = [s.get("q", {}) for s in command.body.get(_WRITES[command.name], [])]
    return [
        f"{command.collection}: write not keyed by _id: {q}"
        for q in statements
        if "_id" not in q or isinstance(q["_id"], dict) and set(q["_id"]) - {"$eq", "$in"}
    ]


def command_problems(db: Database, log: CommandLog) -> list[str]:
    """Every read and write recorded, checked against the indexes the server lists."""
    problems = []
    indexes: dict[str, list[list[str]]] = {}
    for command in log.commands:
        if command.name in _READS:
            if command.collection not in indexes:
                indexes[command.collection] = index_keys(db, command.collection)
            problems += plan_problems(command, indexes[command.collection])
        elif command.name in _WRITES or command.name == "findAndModify":
            problems += write_problems(command)
        elif command.name not in _HARMLESS:
            problems.append(f"unexpected command {command.name}")
    return problems


def explain_path(db: Database, reads: list[Command]) -> str:
    """Explain each read on a server that can: assert that the winning plans use an index
    and never scan the collection. On a server without ``explain``, assert that it says so
    (code 59) for each one. Returns which path ran."""
    assert reads
    outcomes = []
    for command in reads:
        keep = {"find", "filter", "sort", "projection", "aggregate", "pipeline", "cursor"}
        body = {k: v for k, v in command.body.items() if k in keep | {"count", "query"}}
        try:
            plan = db.command({"explain": body, "verbosity": "queryPlanner"})
        except OperationFailure as error:
            assert error.code == 59, f"explain failed for another reason: {error}"
            outcomes.append("unsupported")
            continue
        stages = set(_stages(plan["queryPlanner"]["winningPlan"]))
        assert "COLLSCAN" not in stages, (command.body, stages)
        assert stages & _INDEX_STAGES, (command.body, stages)
        outcomes.append("index")
    assert len(set(outcomes)) == 1, f"explain answered some reads and not others: {outcomes}"
    if outcomes[0] == "unsupported":
        return f"no explain on this server (code 59 for all {len(reads)} reads)"
    return f"explain: every winning plan of {len(reads)} reads uses an index, none scans"


def _stages(plan: object) -> Iterator[str]:
    if isinstance(plan, dict):
        if isinstance(plan.get("stage"), str):
            yield plan["stage"]
        for value in plan.values():
            yield from _stages(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from _stages(value)


# ------------------------------------------------------------------------ generated data


@dataclass
class World:
    """Photos as generated, indexed the way the test evaluates filters."""

    docs: dict[str, dict]
    points: dict[str, PhotoPoint]
    by_cell: dict[int, list[tuple[datetime, str]]] = field(default_factory=dict)
    by_time: list[tuple[datetime, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for photo_id, doc in self.docs.items():
            self.by_cell.setdefault(doc["cell"], []).append((doc["takenAt"], photo_id))
        for rows in self.by_cell.values():
            rows.sort()
        self.by_time = sorted((doc["takenAt"], photo_id) for photo_id, doc in self.docs.items())
        self._t = np.array([p.taken_at.timestamp() for p in self.points.values()])
        self._lon = np.array([p.lon for p in self.points.values()])
        self._lat = np.array([p.lat for p in self.points.values()])
        self._ids = list(self.points)

    def selected(self, query: dict) -> set[str]:
        """Ids of the generated photos a filter selects, as the server should evaluate it
        (datetimes at the millisecond, as BSON stores them)."""
        chosen: set[str] = set()
        for branch in conjunctions(query):
            if _pinned(branch.get("_id")):
                candidates = _values(branch["_id"])
            elif _pinned(branch.get("cell")):
                cells = _values(branch["cell"])
                candidates = [i for c in cells for _, i in self.by_cell.get(c, [])]
            else:
                candidates = list(self.docs)
            chosen |= {i for i in candidates if i in self.docs and _matches(branch, self.docs[i])}
        return chosen

    def fetch(self, windows: list[SearchWindow]) -> list[PhotoPoint]:
        """The engine's ``closure`` fetch over the generated photos."""
        hits = np.zeros(len(self._ids), dtype=bool)
        for w in windows:
            hits |= (
                (self._t >= w.taken_from.timestamp())
                & (self._t <= w.taken_to.timestamp())
                & (self._lon >= w.lon_min)
                & (self._lon <= w.lon_max)
                & (self._lat >= w.lat_min)
                & (self._lat <= w.lat_max)
            )
        return [self.points[self._ids[i]] for i in np.flatnonzero(hits)]

    def neighbourhood(self, members: list[PhotoPoint], reach_m: float, margin: timedelta) -> set:
        """Ids of the photos in a cell within ``reach_m`` of a member, taken within
        ``margin`` of that member."""
        found: set[str] = set()
        for m in members:
            for cell in cells_near(m.lon, m.lat, reach_m):
                rows = self.by_cell.get(cell, [])
                lo = bisect_left(rows, (m.taken_at - margin, ""))
                hi = bisect_right(rows, (m.taken_at + margin, "\U0010ffff"))
                found.update(i for _, i in rows[lo:hi])
        return found


def _pinned(condition: object) -> bool:
    """Whether a condition is an equality or ``$in`` (a list of values to look up)."""
    if condition is None or isinstance(condition, tuple):
        return False
    return not isinstance(condition, dict) or set(condition) <= {"$in", "$eq"}


def _values(condition: object) -> list:
    if isinstance(condition, dict):
        return list(condition.get("$in", [])) + ([condition["$eq"]] if "$eq" in condition else [])
    return [condition]


def _ms(value: object) -> object:
    if isinstance(value, datetime):
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    return value


def _matches(branch: dict, doc: dict) -> bool:
    return all(_holds(doc.get(key), condition) for key, condition in branch.items())


def _holds(value: object, condition: object) -> bool:
    if isinstance(condition, tuple) and condition[0] == "$and":
        return _holds(value, condition[1]) and _holds(value, condition[2])
    if not isinstance(condition, dict):
        return value == _ms(condition)
    tests = {
        "$in": lambda v, arg: v in {_ms(a) for a in arg},
        "$eq": lambda v, arg: v == _ms(arg),
        "$gt": lambda v, arg: v is not None and v > _ms(arg),
        "$gte": lambda v, arg: v is not None and v >= _ms(arg),
        "$lt": lambda v, arg: v is not None and v < _ms(arg),
        "$lte": lambda v, arg: v is not None and v <= _ms(arg),
    }
    return all(tests[op](value, arg) for op, arg in condition.items())


def photo_doc(photo_id: str, taken_at: datetime, lon: float, lat: float) -> dict:
    return {
        "_id": photo_id,
        "location": {"type": "Point", "coordinates": [lon, lat]},
        "cell": cell_of(lon, lat),
        "takenAt": taken_at,
        "uploadedAt": taken_at + timedelta(minutes=2),
        "storageUrl": f"azure://photos/{photo_id}.jpg",
        "eventId": None,
    }


def city(rng: random.Random) -> tuple[list[dict], list[str], list[str]]:
    """About 100,000 photos over ``DAYS`` days: gatherings of 12 to 60 photos within 30 m and
    40 minutes, and lone photos. Returns the documents, the ids of a micro-batch of late
    uploads on ``BATCH_DAY`` (into three gatherings, a new gathering and lone photos), and
    the ids of the photos uploaded on time."""
    docs: list[dict] = []
    gatherings: dict[int, list[tuple[datetime, float, float]]] = {}
    for g in range(2_750):
        lon = LON_MIN + rng.random() * LON_SPAN
        lat = LAT_MIN + rng.random() * LAT_SPAN
        start = T0 + timedelta(seconds=rng.randrange(DAYS * 86_400))
        gatherings.setdefault((start - T0).days, []).append((start, lon, lat))
        for k in range(rng.randint(12, 60)):
            taken = start + timedelta(seconds=rng.randrange(2_400))
            docs.append(photo_doc(f"g{g}-{k}", taken, *_near(rng, lon, lat, 30.0)))
    for i in range(7_000):
        taken = T0 + timedelta(seconds=rng.randrange(DAYS * 86_400))
        lon, lat = LON_MIN + rng.random() * LON_SPAN, LAT_MIN + rng.random() * LAT_SPAN
        docs.append(photo_doc(f"lone-{i}", taken, lon, lat))

    batch: list[dict] = []
    for n, (start, lon, lat) in enumerate(sorted(gatherings[BATCH_DAY])[:3]):
        for k in range(5):
            taken = start + timedelta(seconds=rng.randrange(-600, 2_400))
            batch.append(photo_doc(f"late-{n}-{k}", taken, *_near(rng, lon, lat, 30.0)))
    spot = (LON_MIN + 0.05, LAT_MIN + 0.05)
    for k in range(10):
        taken = T0 + timedelta(days=BATCH_DAY, hours=15, seconds=rng.randrange(1_800))
        batch.append(photo_doc(f"new-{k}", taken, *_near(rng, *spot, 20.0)))
    for k in range(10):
        taken = T0 + timedelta(days=BATCH_DAY, seconds=rng.randrange(86_400))
        lon, lat = LON_MIN + rng.random() * LON_SPAN, LAT_MIN + rng.random() * LAT_SPAN
        batch.append(photo_doc(f"late-lone-{k}", taken, lon, lat))
    return docs + batch, [d["_id"] for d in batch], [d["_id"] for d in docs]


def _near(rng: random.Random, lon: float, lat: float, metres: float) -> tuple[float, float]:
    north = (rng.random() * 2 - 1) * metres / 111_195.0
    east = (rng.random() * 2 - 1) * metres / (111_195.0 * math.cos(math.radians(lat)))
    return lon + east, lat + north


def point(doc: dict) -> PhotoPoint:
    lon, lat = doc["location"]["coordinates"]
    return PhotoPoint(doc["_id"], doc["takenAt"], lon, lat)


@dataclass
class Stored:
    uri: str
    database: str
    world: World
    batch_ids: list[str]


@pytest.fixture(scope="module")
def large() -> Iterator[Stored]:
    """The large collection: ~100,000 photos, the events of a canonical pass over all but the
    micro-batch (which is stored unlinked, as ingest leaves it), bulk-inserted."""
    uri = stack_setting("MONGODB_URI")
    database = f"snapmap_test_plans_{uuid.uuid4().hex[:10]}"
    docs, batch_ids, on_time = city(random.Random(20260301))
    by_id = {d["_id"]: d for d in docs}
    result = canonical_pass([point(by_id[i]) for i in on_time], PARAMS)
    for photo_id, event_id in result.assignment.items():
        by_id[photo_id]["eventId"] = event_id
    events = [
        {"_id": e.event_id, **event_fields(e, PARAMS), "version": 1, "publishedVersion": 1}
        | {"updatedAt": T0, "publishPending": False, "manifestPending": False}
        for e in result.events.values()
    ]

    client = MongoClient(uri, tz_aware=True, connectTimeoutMS=60_000)
    db = client[database]
    ensure_schema(db)
    for start in range(0, len(docs), 20_000):
        db.photos.insert_many(docs[start : start + 20_000], ordered=False)
    for start in range(0, len(events), 20_000):
        db.events.insert_many(events[start : start + 20_000], ordered=False)
    world = World(by_id, {d["_id"]: point(d) for d in docs})
    yield Stored(uri, database, world, batch_ids)
    client.drop_database(database)
    client.close()


# ------------------------------------------------------------------------------ the checks


def read_round_trip_bound(seeds: int, report: ReclusterReport, log: CommandLog) -> int:
    """Reads of one recluster: ``ceil(seeds / 5000)`` finds by ``_id``, the closure's queries
    (one per round unless a round has more than 200 time ranges: then at most
    ``rounds + branches // 200``), one find each for queued links and stored events per 5,000
    closure photos, plus getMores: at most ``ceil(returned / 10,000)`` per find."""
    closure_finds = [c for c in log.reads("photos") if _is_neighbourhood(c)]
    branches = sum(len(c.body["filter"].get("$or", [None])) for c in closure_finds)
    assert report.closure_queries == len(closure_finds)
    assert len(closure_finds) <= report.closure_rounds + branches // BRANCHES_PER_QUERY
    per_closure = math.ceil(report.closure_photos / IDS_PER_QUERY)
    finds = math.ceil(seeds / IDS_PER_QUERY) + len(closure_finds) + 2 * per_closure
    get_mores = sum(math.ceil(len(c.returned) / REPLY_DOCS) for c in log.reads())
    return finds + get_mores


def _is_neighbourhood(command: Command) -> bool:
    return any("cell" in branch for branch in conjunctions(command.body.get("filter", {})))


def assert_loads_are_indexed_and_bounded(
    stored: Stored, mon: Monitored, seeds: list[str], report: ReclusterReport, record
) -> dict:
    """The checks shared by the micro-batch and the backfill; returns the measured counts."""
    world = stored.world
    plain = mon.plain[stored.database]
    assert command_problems(plain, mon.log) == []
    photo_reads = mon.log.reads("photos")
    assert any(_is_neighbourhood(c) for c in photo_reads), "no neighbourhood query was made"
    for command in photo_reads:
        query, _ = read_filter(command)
        assert set(command.returned) == world.selected(query), query
        assert command.get_mores <= math.ceil(len(command.returned) / REPLY_DOCS)

    seed_points = [world.points[i] for i in seeds]
    members = closure(seed_points, world.fetch, PARAMS)
    assert report.closure_photos == len(members)
    returned = {i for c in photo_reads for i in c.returned}
    assert {m.photo_id for m in members} <= returned

    last = report.closure_rounds - 1
    reach = (link_reach_m(PARAMS.radius_m) + 1.0) * 2 ** min(last, 4)
    margin = PARAMS.window * 2 ** min(last, 6) + PARAMS.window  # the W grid adds up to W
    envelope = world.neighbourhood(members, reach, margin)
    outside = returned - envelope - set(seeds)
    assert not outside, (
        f"{len(outside)} photos outside the neighbourhood, e.g. {sorted(outside)[:5]}"
    )

    bound = read_round_trip_bound(len(seeds), report, mon.log)
    reads = mon.log.reads()
    read_trips = len(reads) + sum(c.get_mores for c in reads)
    assert read_trips <= bound
    record("explain", explain_path(plain, reads))
    counts = {
        "photos_stored": len(world.docs),
        "seeds": len(seeds),
        "closure": len(members),
        "rounds": report.closure_rounds,
        "neighbourhood_queries": report.closure_queries,
        "photos_returned": len(returned),
        "neighbourhood_envelope": len(envelope),
        "read_round_trips": read_trips,
        "read_round_trip_bound": bound,
        "all_round_trips": mon.log.round_trips(),
        "failed_and_retried_commands": mon.log.failures(),
    }
    for name, value in counts.items():
        record(name, value)
    return counts


def assert_canonical(db: Database, points: list[PhotoPoint]) -> None:
    """The links (queued or applied) and live events of ``points`` (a union of linked
    components of the store) equal the oracle's pass over them."""
    expected = oracle_pass([(p.photo_id, p.taken_at, p.lon, p.lat) for p in points])
    assert not expected.fragile
    ids = [p.photo_id for p in points]
    photos = {d["_id"]: d for d in db.photos.find({"_id": {"$in": ids}})}
    assert effective_links(db, photos) == expected.assignment
    stored = {d["_id"]: d for d in db.events.find({"_id": {"$in": list(expected.events)}})}
    for event_id, want in expected.events.items():
        event = stored[event_id]
        assert event["mergedInto"] is None and event["photoCount"] == len(want.members)
        assert (event["startAt"], event["endAt"]) == (want.start_at, want.end_at)
        assert event["firstPhotoId"] == want.first_photo_id
        lon, lat = event["centroid"]["coordinates"]
        assert great_circle_m(lon, lat, *want.centre()) < 1e-6


# ------------------------------------------------------------------------------ the tests


def test_a_micro_batch_loads_only_its_neighbourhood_by_index(large, record_property):
    mon = monitored(large.uri, large.database)
    try:
        report = recluster(mon.db, large.batch_ids, PARAMS)
        counts = assert_loads_are_indexed_and_bounded(
            large, mon, large.batch_ids, report, record_property
        )
        assert counts["photos_returned"] * 100 < counts["photos_stored"]
        # The batch's closures span less than an hour: 12 W from any seed photo.
        assert report.closure_rounds <= 2 + math.ceil(math.log2(1 + 12))

        # Links stay queued: applying them is the link step's work (and on the local server
        # each of those conditional updates scans the collection).
        members = closure([large.world.points[i] for i in large.batch_ids], large.world.fetch)
        assert_canonical(mon.plain[large.database], members)
    finally:
        mon.close()


def test_a_daily_backfill_loads_one_day_by_index(large, record_property):
    start = T0 + timedelta(days=BACKFILL_DAY)
    end = start + timedelta(days=1)
    pages, mon = monitored(large.uri, large.database), monitored(large.uri, large.database)
    try:
        (day,) = list(day_photo_chunks(pages.db, start, end, 50_000))
        chunk = day.ids
        assert set(chunk) == {i for t, i in large.world.by_time if start <= t < end}
        assert command_problems(pages.plain[large.database], pages.log) == []
        (day_read,) = pages.log.reads()
        assert set(day_read.returned) == large.world.selected(read_filter(day_read)[0])
        # One find; after a first reply of 101 documents, pymongo asks for the rest in one
        # getMore (both servers cut replies at 16 MiB, far above one day page of ids).
        assert day_read.get_mores <= 1

        report = recluster(mon.db, chunk, PARAMS)
        assert_loads_are_indexed_and_bounded(large, mon, chunk, report, record_property)
        # Closures of a day reach at most one gathering (40 minutes, 8 W) past midnight.
        assert report.closure_rounds <= 2 + math.ceil(math.log2(1 + 8))
    finally:
        pages.close()
        mon.close()


def street_crowd(count: int) -> list[dict]:
    """A crowd along a 1.2 km street for hours: each photo 40 m and one minute after the
    previous one, walking the street back and forth. Every photo is linked to the next two,
    so the whole crowd is one linked component."""
    lon0, lat0, step = 81.8300, 25.4400, 40.0
    legs = 30
    docs = []
    for i in range(count):
        along = i % (2 * legs)
        along = along if along < legs else 2 * legs - along
        lon = lon0 + along * step / (111_195.0 * math.cos(math.radians(lat0)))
        docs.append(photo_doc(f"street-{i:04d}", T0 + timedelta(minutes=i), lon, lat0))
    return docs


def procession(count: int) -> list[dict]:
    """A procession walking east: each photo 40 m and one minute after the previous one."""
    lon0, lat0, step = 81.7000, 25.4300, 40.0
    degrees = step / (111_195.0 * math.cos(math.radians(lat0)))
    return [
        photo_doc(f"walk-{i:04d}", T0 + timedelta(minutes=i), lon0 + i * degrees, lat0)
        for i in range(count)
    ]


def lone_photos(rng: random.Random, count: int) -> list[dict]:
    """Unrelated photos over the same hours across the city (some may link to the chain)."""
    return [
        photo_doc(
            f"other-{i}",
            T0 + timedelta(seconds=rng.randrange(6 * 3_600)),
            LON_MIN - 0.1 + rng.random() * (LON_SPAN + 0.1),
            LAT_MIN + rng.random() * LAT_SPAN,
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("shape", ["street", "procession"])
def test_a_long_chain_loads_in_few_rounds_and_clusters_canonically(mongo, shape, record_property):
    """240 photos over four hours, linked one to the next, and a late photo in the middle of
    them: its closure is the whole chain. Hop by hop that took 60 rounds (two hops each way
    per round); widening rounds take a few, and the events equal the oracle's."""
    chain = street_crowd(240) if shape == "street" else procession(240)
    docs = chain + lone_photos(random.Random(5), 400)
    with mongo.session_db() as db:
        db.photos.insert_many(docs, ordered=False)
    world = World({d["_id"]: d for d in docs}, {d["_id"]: point(d) for d in docs})
    seed = chain[120]["_id"]

    mon = monitored(mongo.uri, mongo.database)
    try:
        report = recluster(mon.db, [seed], PARAMS)
        stored = Stored(mongo.uri, mongo.database, world, [seed])
        counts = assert_loads_are_indexed_and_bounded(stored, mon, [seed], report, record_property)
    finally:
        mon.close()
    members = closure([world.points[seed]], world.fetch, PARAMS)
    assert {d["_id"] for d in chain} <= {m.photo_id for m in members}

    # Two hours each way from the seed: 24 W. Rounds double the margin, so the chain's end is
    # reached once W * (2 ** rounds - 1) passes 24 W: 5 rounds, plus one that finds nothing.
    # Along the procession (4.8 km each way) the reach doubles only to 1.6 km (about one
    # more ring of 1 km cells), so a few more rounds cross the rest in cells.
    hours_each_way = 2
    bound = 1 + math.ceil(math.log2(1 + hours_each_way * 3_600 / PARAMS.window_s))
    if shape == "procession":
        bound += 3
    assert counts["rounds"] <= bound
    assert counts["neighbourhood_queries"] == counts["rounds"]

    with mongo.session_db() as db:
        apply_pending_links(db)
        assert_canonical(db, members)


def test_the_plan_check_refuses_unindexed_reads_and_a_missing_index(mongo):
    """The checks above can fail: shapes no index can answer are refused, and with the
    ``(cell, takenAt)`` index dropped the real closure load is refused too."""
    with mongo.session_db() as db:
        indexes = index_keys(db, "photos")
        taken = T0 + timedelta(hours=1)
        photos = [photo_doc(f"p{i}", taken, 81.83 + i * 1e-4, 25.44) for i in range(3)]
        db.photos.insert_many(photos)
        db.photos.drop_index("cell_1_takenAt_1")

    def problems(query: dict, sort: dict | None = None) -> list[str]:
        body = {"find": "photos", "filter": query} | ({"sort": sort} if sort else {})
        return plan_problems(Command("find", "photos", body), indexes)

    around = {"$gte": T0, "$lte": T0 + timedelta(minutes=5)}
    good = {"cell": {"$in": [1, 2]}, "takenAt": around}
    assert problems(good) == []
    assert problems({"$or": [good, {"_id": {"$in": ["a"]}}]}) == []
    assert problems({"takenAt": around}, sort={"takenAt": 1, "_id": 1}) == []
    for bad in (
        {},
        good | {"deadLettered": {"$ne": True}},
        {"takenAt": around, "storageUrl": "azure://photos/a.jpg"},
        {"storageUrl": Regex("^azure")},
        {"storageUrl": re.compile("^azure")},
        {"$where": "this.cell > 0"},
        {"cell": {"$exists": True}},
        {"uploadedAt": around, "cell": 1},  # no index leads with both
        {"$or": [good, {"storageUrl": "x"}]},
    ):
        assert problems(bad), bad
    assert problems({"takenAt": around}, sort={"uploadedAt": 1})

    mon = monitored(mongo.uri, mongo.database)
    try:
        recluster(mon.db, ["p0"], PARAMS)
        found = command_problems(mon.plain[mongo.database], mon.log)
    finally:
        mon.close()
    assert found and all("no index leads with ['cell', 'takenAt']" in p for p in found), found


def test_the_photos_an_event_holds_are_read_by_index(mongo, record_property):
    """``photos_linked_to`` (retiring emptied events, releasing dead-lettered photos) finds an
    event's photos by ``eventId`` in ``photos`` and in the queued ``pending_links``: every read
    it makes leads with an indexed field, and the answer counts both kinds of link."""
    with mongo.session_db() as db:
        photos = [
            photo_doc(f"p{i}", T0 + timedelta(minutes=i), 81.83 + i * 1e-4, 25.44) for i in range(6)
        ]
        for doc in photos[:3]:
            doc["eventId"] = "ev-a"
        db.photos.insert_many(photos)
        # p0 moves to ev-b by a queued decision; p3 and p4 are linked only by theirs.
        queue_links(db, {"p0": "ev-b", "p3": "ev-a", "p4": "ev-b"}, token=7)

    mon = monitored(mongo.uri, mongo.database)
    try:
        held = photos_linked_to(mon.db, ["ev-a", "ev-b", "ev-none"])
        plain = mon.plain[mongo.database]
        assert {c.collection for c in mon.log.reads()} == {"photos", "pending_links"}
        assert command_problems(plain, mon.log) == []
        record_property("explain", explain_path(plain, mon.log.reads()))
    finally:
        mon.close()
    assert held == {"ev-a": ["p1", "p2", "p3"], "ev-b": ["p0", "p4"]}
