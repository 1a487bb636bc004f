"""The sweeper: asset checks that find what the streaming path left behind, and heal what can be
healed through the same ``recluster`` the streaming runs use.

- ``orphan_photos``: photos with no event, uploaded longer ago than the grace period (a lost
  Kafka message, exhausted retries) are reclustered, linked and published (WARN if any remain).
- ``event_photo_counts``: every event's ``photoCount`` equals the photos linked to it (ERROR).
- ``tombstone_targets``: every tombstone's ``mergedInto`` chain ends at a live event or a
  retired one (ERROR).
- ``storage_urls_exist``: a sample of recent photos' blobs exist (WARN). Outages and auth
  failures are reported as errors, never as missing blobs (cases.md #40, #41).
- ``event_manifests_exist``: the manifests of a sample of recently changed events, recorded as
  written, exist in Blob Storage with the recorded content (WARN); a missing or different one
  is made pending again and written at once. Errors are never counted as missing.

Checks in a run may execute side by side and beside streaming runs. Count mismatches are
therefore confirmed under the clustering lease with the link queue drained before they are
reported, so a run caught between writing events and linking photos is not a false alarm.
"""

# No `from __future__ import annotations` here: Dagster validates the `context` parameter's
# annotation as a class, not a string.
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from azure.core.exceptions import AzureError, ServiceRequestError, ServiceResponseError
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetSelection,
    DefaultScheduleStatus,
    MetadataValue,
    ScheduleDefinition,
    asset_check,
    define_asset_job,
)
from pymongo import UpdateOne
from pymongo.database import Database

from snapmap_pipeline.assets.backfill import apply_all_links, publish_all
from snapmap_pipeline.assets.events import events, photo_event_links
from snapmap_pipeline.contract.storage_url import StorageUrlError
from snapmap_pipeline.jobs import SWEEPER_JOB_NAME
from snapmap_pipeline.resources.blob import BlobStatus, BlobStorageResource, redact
from snapmap_pipeline.resources.kafka import KafkaResource
from snapmap_pipeline.resources.mongo import MongoResource
from snapmap_pipeline.settings import PipelineSettings
from snapmap_pipeline.store.dead_letters import DeadLetter, send_dead_letters, with_original_bytes
from snapmap_pipeline.store.lease import clustering_lease
from snapmap_pipeline.store.outbox import write_pending_manifests
from snapmap_pipeline.store.photos import orphan_ids
from snapmap_pipeline.store.poison import (
    TRANSIENT,
    Release,
    attempt_record_pages,
    recluster_isolating_poison,
    release_dead_lettered,
)
from snapmap_pipeline.store.recluster import ReclusterReport, recluster

EXAMPLES = 10
# Tombstone chains longer than this are reported: merges of merges are rare and short.
MAX_CHAIN_HOPS = 50
_IN_CHUNK = 5000


def orphan_filter(uploaded_before: datetime) -> dict:
    """Photos the sweeper heals; the same selection as ``store.photos.orphan_ids``."""
    return {
        "eventId": None,
        "uploadedAt": {"$lt": uploaded_before},
        "deadLettered": {"$ne": True},
    }


@dataclass
class Sweep:
    """What one orphan sweep found and did."""

    found: int = 0
    swept: list[str] = field(default_factory=list)
    healed: int = 0
    #: Dead-lettered photos taken out of the events they still linked to, and events retired.
    released: int = 0
    retired: int = 0
    #: Partners of those events whose recluster failed at the attempt limit (dead-lettered),
    #: and dead-lettered photos left linked while a partner fails below the limit.
    partners_dead_lettered: int = 0
    release_waiting: int = 0
    dead_lettered: int = 0
    remaining: int = 0
    remaining_examples: list[str] = field(default_factory=list)
    event_updates: int = 0
    manifests_pending: int = 0


def sweep_orphans(
    db: Database,
    kafka: KafkaResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
    now: datetime,
) -> Sweep:
    """Recluster up to ``sweep_limit`` orphans older than the grace period, link and publish.
    A photo that fails again and again is dead-lettered like in a streaming run. First,
    dead-lettered photos that still link to an event (a run that stopped while releasing them)
    are released; a partner of theirs whose recluster fails is isolated like a poison photo
    (counted, dead-lettered at the limit) and the sweep goes on. If the release fails
    otherwise (not for an outage), the orphans are still healed, then the failure is raised."""
    params = settings.cluster_params()

    def step(ids: Sequence[str]) -> ReclusterReport:
        return recluster(db, ids, params)

    def dead_letter(letters: list[DeadLetter]) -> int:
        return send_dead_letters(
            db, kafka, settings.dead_letter_topic, with_original_bytes(kafka, letters)
        )

    cutoff = now - timedelta(minutes=settings.orphan_grace_minutes)
    sweep = Sweep(found=db.photos.count_documents(orphan_filter(cutoff)))
    release_failure: Exception | None = None
    release = Release()
    try:
        # Every photo ever dead-lettered keeps its attempt record: read a page at a time.
        for page in attempt_record_pages(db):
            release.merge(
                release_dead_lettered(db, page, step, dead_letter, settings.max_poison_attempts)
            )
    except TRANSIENT:
        raise
    except Exception as error:  # noqa: BLE001 - raised once the orphans are healed
        # A failure no partner is blamed for must not stop the orphans' healing, which
        # reclusters other photos; the photos stay linked (their events' counts show it) and
        # the failure fails the check after the healing.
        release_failure = error
    sweep.released, sweep.retired = len(release.released), len(release.retired)
    sweep.partners_dead_lettered = len(release.dead_lettered)
    sweep.release_waiting = len(release.waiting)
    sweep.swept = orphan_ids(db, cutoff, settings.sweep_limit)

    if sweep.swept:
        _, poisoned = recluster_isolating_poison(
            db, sweep.swept, step, dead_letter, settings.max_poison_attempts
        )
        sweep.dead_lettered = len(poisoned)
    if sweep.swept or release.released or release.partners:
        apply_all_links(db)
        published = publish_all(db, kafka, blob, settings.event_updates_topic)
        sweep.event_updates = published.event_updates
        sweep.manifests_pending = published.manifests_pending
        sweep.healed = sum(
            db.photos.count_documents({"_id": {"$in": chunk}, "eventId": {"$ne": None}})
            for chunk in _chunks(sweep.swept)
        )
    sweep.remaining = db.photos.count_documents(orphan_filter(cutoff))
    sweep.remaining_examples = orphan_ids(db, cutoff, EXAMPLES)
    if release_failure is not None:
        raise release_failure
    return sweep


@asset_check(
    asset=photo_event_links,
    name="orphan_photos",
    description=(
        "Photos with no event, uploaded more than the grace period ago, are reclustered, "
        "linked and published; fails (WARN) when any is left."
    ),
)
def orphan_photos(
    context: AssetCheckExecutionContext,
    mongo: MongoResource,
    kafka: KafkaResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
) -> AssetCheckResult:
    sweep = sweep_orphans(mongo.db(), kafka, blob, settings, datetime.now(UTC))
    context.log.info(
        "orphan sweep: %d orphans older than %g min found, %d swept, %d healed, "
        "%d dead-lettered, %d remain; %d event updates published",
        sweep.found,
        settings.orphan_grace_minutes,
        len(sweep.swept),
        sweep.healed,
        sweep.dead_lettered,
        sweep.remaining,
        sweep.event_updates,
    )
    if sweep.release_waiting:
        context.log.warning(
            "%d dead-lettered photos stay linked to their events while a partner fails (its "
            "attempts are counted; it is dead-lettered at the limit); %d partners dead-lettered",
            sweep.release_waiting,
            sweep.partners_dead_lettered,
        )
    if sweep.remaining:
        context.log.warning(
            "%d orphan photos remain after the sweep, e.g. %s",
            sweep.remaining,
            ", ".join(sweep.remaining_examples),
        )
    return AssetCheckResult(
        passed=sweep.remaining == 0,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "orphans_found": sweep.found,
            "orphans_swept": len(sweep.swept),
            "orphans_healed": sweep.healed,
            "orphans_dead_lettered": sweep.dead_lettered,
            "dead_lettered_released": sweep.released,
            "events_retired": sweep.retired,
            "partners_dead_lettered": sweep.partners_dead_lettered,
            "release_waiting": sweep.release_waiting,
            "orphans_remaining": sweep.remaining,
            "event_updates_published": sweep.event_updates,
            "manifests_pending": sweep.manifests_pending,
            "grace_minutes": settings.orphan_grace_minutes,
            "swept_examples": MetadataValue.json(sweep.swept[:EXAMPLES]),
            "remaining_examples": MetadataValue.json(sweep.remaining_examples),
        },
    )


@dataclass(frozen=True)
class CountMismatch:
    """An event whose stored ``photoCount`` (None: no such event) disagrees with its links."""

    event_id: str
    stored: int | None
    linked: int
    tombstone: bool

    def describe(self) -> str:
        kind = "tombstone" if self.tombstone else "event"
        if self.stored is None:
            return f"{self.event_id}: no such event, {self.linked} photos link to it"
        return f"{kind} {self.event_id}: photoCount {self.stored}, {self.linked} photos linked"


def _linked_counts(db: Database, event_ids: Sequence[str] | None = None) -> Iterator[dict]:
    """``{_id: eventId, photos: n}`` for linked photos, sorted by event id."""
    match: dict = {"eventId": {"$ne": None}, "deadLettered": {"$ne": True}}
    if event_ids is not None:
        match["eventId"] = {"$in": list(event_ids)}
    return db.photos.aggregate(
        [
            {"$match": match},
            {"$group": {"_id": "$eventId", "photos": {"$sum": 1}}},
            {"$sort": {"_id": 1}},
        ]
    )


def _mismatch(event_id: str, event: dict | None, linked: int) -> CountMismatch | None:
    if event is None:
        return CountMismatch(event_id, None, linked, tombstone=False) if linked else None
    tombstone = event.get("mergedInto") is not None
    stored = int(event.get("photoCount", 0))
    # photoCount 0 without mergedInto is a retired event (its photos were dead-lettered).
    consistent = stored == linked and (stored == 0 or not tombstone)
    return None if consistent else CountMismatch(event_id, stored, linked, tombstone)


def suspect_counts(db: Database) -> tuple[int, list[CountMismatch]]:
    """One pass merging the linked counts with the events, both in event-id order (memory
    stays flat however many events there are). Returns (events checked, suspects)."""
    stored = db.events.find({}, {"photoCount": 1, "mergedInto": 1}).sort("_id", 1)
    linked = _linked_counts(db)
    suspects: list[CountMismatch] = []
    checked = 0
    event = next(stored, None)
    group = next(linked, None)
    while event is not None or group is not None:
        if group is None or (event is not None and event["_id"] < group["_id"]):
            found = _mismatch(event["_id"], event, 0)
            checked += 1
            event = next(stored, None)
        elif event is None or group["_id"] < event["_id"]:
            found = _mismatch(group["_id"], None, group["photos"])
            group = next(linked, None)
        else:
            found = _mismatch(event["_id"], event, group["photos"])
            checked += 1
            event = next(stored, None)
            group = next(linked, None)
        if found is not None:
            suspects.append(found)
    return checked, suspects


def confirm_counts(db: Database, suspects: Sequence[CountMismatch]) -> list[CountMismatch]:
    """Recount the suspects while holding the clustering lease with the link queue drained:
    no run can be between writing events and linking their photos then."""
    if not suspects:
        return []
    ids = [s.event_id for s in suspects]
    confirmed: list[CountMismatch] = []
    with clustering_lease(db):
        apply_all_links(db, take_lease=False)
        for chunk in _chunks(ids):
            linked = {g["_id"]: g["photos"] for g in _linked_counts(db, chunk)}
            stored = {
                e["_id"]: e
                for e in db.events.find({"_id": {"$in": chunk}}, {"photoCount": 1, "mergedInto": 1})
            }
            for event_id in chunk:
                found = _mismatch(event_id, stored.get(event_id), linked.get(event_id, 0))
                if found is not None:
                    confirmed.append(found)
    return confirmed


@asset_check(
    asset=events,
    name="event_photo_counts",
    description=(
        "Every event's photoCount equals the number of photos linked to it; tombstones and "
        "retired events have none, live events at least one, and no photo links to an event "
        "that does not exist."
    ),
)
def event_photo_counts(
    context: AssetCheckExecutionContext, mongo: MongoResource
) -> AssetCheckResult:
    db = mongo.db()
    checked, suspects = suspect_counts(db)
    confirmed = confirm_counts(db, suspects)
    context.log.info(
        "photo counts: %d events checked, %d suspects, %d mismatches confirmed under the lease",
        checked,
        len(suspects),
        len(confirmed),
    )
    if confirmed:
        context.log.error(
            "%d events disagree with their photos, e.g. %s",
            len(confirmed),
            "; ".join(m.describe() for m in confirmed[:3]),
        )
    return AssetCheckResult(
        passed=not confirmed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "events_checked": checked,
            "suspects": len(suspects),
            "mismatches": len(confirmed),
            "dangling_links": sum(1 for m in confirmed if m.stored is None),
            "examples": MetadataValue.json([m.describe() for m in confirmed[:EXAMPLES]]),
        },
    )


def broken_tombstones(db: Database) -> tuple[int, list[str]]:
    """Follow every tombstone's ``mergedInto`` chain, a batch of tombstones at a time, to a live
    event. Returns (tombstones checked, one line per broken chain)."""
    checked = 0
    broken: list[str] = []
    batch: dict[str, str] = {}
    query = {"mergedInto": {"$ne": None}}
    for doc in db.events.find(query, {"mergedInto": 1}).sort("_id", 1):
        batch[doc["_id"]] = doc["mergedInto"]
        if len(batch) >= _IN_CHUNK:
            broken += _follow_chains(db, batch)
            checked += len(batch)
            batch = {}
    if batch:
        broken += _follow_chains(db, batch)
        checked += len(batch)
    return checked, broken


def _follow_chains(db: Database, heads: dict[str, str]) -> list[str]:
    """``heads``: tombstone id -> the event it points at. One query per hop for the batch."""
    broken: list[str] = []
    visited = {tombstone: {tombstone} for tombstone in heads}
    for _ in range(MAX_CHAIN_HOPS):
        if not heads:
            return broken
        targets: dict[str, str | None] = {}
        for chunk in _chunks(sorted(set(heads.values()))):
            for doc in db.events.find({"_id": {"$in": chunk}}, {"mergedInto": 1}):
                targets[doc["_id"]] = doc.get("mergedInto")
        following: dict[str, str] = {}
        for tombstone, target in heads.items():
            if target not in targets:
                broken.append(f"{tombstone}: mergedInto {target} does not exist")
            elif targets[target] is None:
                continue
            elif targets[target] in visited[tombstone]:
                broken.append(f"{tombstone}: mergedInto chain loops back at {target}")
            else:
                visited[tombstone].add(target)
                following[tombstone] = targets[target]
        heads = following
    broken += [f"{t}: mergedInto chain longer than {MAX_CHAIN_HOPS} hops" for t in heads]
    return broken


@asset_check(
    asset=events,
    name="tombstone_targets",
    description=(
        "Every tombstone's mergedInto names an event that exists, and following mergedInto "
        "from it ends at a live event or a retired one (no dead end, no loop)."
    ),
)
def tombstone_targets(
    context: AssetCheckExecutionContext, mongo: MongoResource
) -> AssetCheckResult:
    checked, broken = broken_tombstones(mongo.db())
    context.log.info(
        "tombstones: %d checked, %d do not resolve to a live event", checked, len(broken)
    )
    if broken:
        context.log.error("broken tombstones, e.g. %s", "; ".join(broken[:3]))
    return AssetCheckResult(
        passed=not broken,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "tombstones_checked": checked,
            "broken_tombstones": len(broken),
            "examples": MetadataValue.json(broken[:EXAMPLES]),
        },
    )


@dataclass
class StorageSample:
    """Existence of a sample of photos' blobs; ``errors`` are checks that could not answer.
    ``unreachable`` is set when the service could not be reached at all (refused connection,
    timeout): sampling stops there and ``not_checked`` photos are left for the next sweep."""

    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unparseable: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unreachable: str | None = None
    not_checked: int = 0

    @property
    def sampled(self) -> int:
        return len(self.present) + len(self.missing) + len(self.unparseable) + len(self.errors)


class StorageUnreachable(Exception):
    """No connection to Blob Storage (after the resource's own retries)."""


def sample_storage(db: Database, blob: BlobStorageResource, size: int) -> StorageSample:
    """Check the blobs of the ``size`` most recently uploaded photos (a deterministic sample)
    and record ``blobStatus: "missing"`` on the photos whose blob is gone (cleared when it is
    back). A failed check changes nothing on the photo. The first connection-level failure
    ends the sample: every further call would wait out the same outage."""
    photos = list(
        db.photos.find({"storageUrl": {"$ne": None}}, {"storageUrl": 1})
        .sort([("uploadedAt", -1), ("_id", 1)])
        .limit(size)
    )
    sample = StorageSample()
    _check_each(blob, photos, sample, lambda client, photo: _check_one(blob, client, photo, sample))
    if sample.missing:
        db.photos.update_many({"_id": {"$in": sample.missing}}, {"$set": {"blobStatus": "missing"}})
    if sample.present:
        db.photos.update_many(
            {"_id": {"$in": sample.present}, "blobStatus": {"$exists": True}},
            {"$unset": {"blobStatus": ""}},
        )
    return sample


def _check_each(
    blob: BlobStorageResource,
    items: list[dict],
    sample: "StorageSample | ManifestSample",
    check: Callable[[object, dict], None],
) -> None:
    """Run ``check(client, item)`` on each of ``items``, which records its outcome in
    ``sample``. The first connection-level failure ends the sample (every further call would
    wait out the same outage); account settings that cannot work (``BlobConfigError``, a
    malformed connection string) make every item not checked yet an error, none missing."""
    if not items:
        return
    try:
        with blob.service() as client:
            for item in items:
                check(client, item)
    except StorageUnreachable as error:
        sample.unreachable = str(error)
        sample.not_checked = len(items) - sample.sampled
    except ValueError as error:
        sample.errors += [f"{item['_id']}: {error}" for item in items[sample.sampled :]]


def _ask(item_id: str, check: Callable[[], BlobStatus]) -> BlobStatus:
    """One existence check. No connection or no answer raises ``StorageUnreachable`` (the
    service is down or cut off, not this blob); any other SDK failure is an ``error`` status,
    never ``missing``."""
    try:
        return check()
    except (ServiceRequestError, ServiceResponseError) as error:
        raise StorageUnreachable(
            f"{type(error).__name__} checking {item_id}: {_first_line(error)}"
        ) from error
    except AzureError as error:
        return BlobStatus(item_id, "error", f"{type(error).__name__}: {redact(str(error))[:200]}")


def _check_one(blob: BlobStorageResource, client, photo: dict, sample: StorageSample) -> None:
    photo_id = photo["_id"]
    try:
        status = _ask(photo_id, lambda: blob.blob_status(client, photo["storageUrl"]))
    except StorageUrlError as error:
        sample.unparseable.append(f"{photo_id}: {error}")
        return
    if status.status == "present":
        sample.present.append(photo_id)
    elif status.status == "missing":
        sample.missing.append(photo_id)
    else:
        sample.errors.append(f"{photo_id}: {status.detail}")


def _first_line(error: Exception) -> str:
    return (redact(str(error)).strip().splitlines() or [""])[0][:200]


@asset_check(
    asset=photo_event_links,
    name="storage_urls_exist",
    description=(
        "The blobs of the most recently uploaded photos exist in Blob Storage. Missing blobs "
        "are recorded on the photo (blobStatus) and fail the check with a warning; checks that "
        "could not answer (auth, outage) are reported apart and never counted as missing. An "
        "unreachable service ends the sample at the first failed connection (a warning)."
    ),
)
def storage_urls_exist(
    context: AssetCheckExecutionContext,
    mongo: MongoResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
) -> AssetCheckResult:
    sample = sample_storage(mongo.db(), blob, settings.storage_sample_size)
    context.log.info(
        "storage sample: %d photos, %d present, %d missing, %d unparseable, %d not checked "
        "(errors), %d skipped (storage unreachable)",
        sample.sampled,
        len(sample.present),
        len(sample.missing),
        len(sample.unparseable),
        len(sample.errors),
        sample.not_checked,
    )
    if sample.unreachable:
        context.log.warning(
            "Blob Storage unreachable, sample stopped after %d of %d photos: %s",
            sample.sampled,
            sample.sampled + sample.not_checked,
            sample.unreachable,
        )
    if sample.errors:
        context.log.warning(
            "%d blob checks failed without an answer (auth or outage), e.g. %s",
            len(sample.errors),
            sample.errors[0],
        )
    problems = []
    if sample.unreachable:
        problems.append(
            f"Blob Storage unreachable ({sample.unreachable}); {sample.not_checked} photos "
            "not checked"
        )
    if sample.missing:
        problems.append(f"{len(sample.missing)} photos have no blob")
    if sample.unparseable:
        problems.append(f"{len(sample.unparseable)} storageUrls cannot be parsed")
    if sample.errors:
        problems.append(f"{len(sample.errors)} blobs could not be checked (see errors)")
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.WARN,
        description="; ".join(problems) or f"{sample.sampled} sampled blobs exist",
        metadata={
            "sampled": sample.sampled,
            "present": len(sample.present),
            "missing": len(sample.missing),
            "unparseable": len(sample.unparseable),
            "errors": len(sample.errors),
            "storage_unreachable": sample.unreachable is not None,
            "not_checked": sample.not_checked,
            "missing_examples": MetadataValue.json(sample.missing[:EXAMPLES]),
            "unparseable_examples": MetadataValue.json(sample.unparseable[:EXAMPLES]),
            "error_examples": MetadataValue.json(sample.errors[:EXAMPLES]),
        },
    )


# Every event whose manifest the outbox wrote: live events, tombstones (their manifest points
# to the event they were merged into, see ``outbox.manifest_of``) and retired events (an empty
# album) alike. An event still pending is left to the manifest pass.
WRITTEN_MANIFESTS = {"manifestPending": False, "manifestSha256": {"$ne": None}}


@dataclass
class ManifestSample:
    """What a sample of written manifests showed. ``different``: the blob exists with another
    ``sha256`` than the event records (an older copy restored, say). ``repaired``: events made
    pending again for the next manifest pass (not those changed since they were read).
    ``errors`` and ``unreachable`` as in ``StorageSample``: nothing is repaired for them."""

    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    repaired: int = 0
    unreachable: str | None = None
    not_checked: int = 0

    @property
    def sampled(self) -> int:
        return len(self.present) + len(self.missing) + len(self.different) + len(self.errors)


def sample_manifests(db: Database, blob: BlobStorageResource, size: int) -> ManifestSample:
    """Check the manifests of the ``size`` most recently changed events whose manifest is
    recorded as written (a deterministic sample), one request each, and make those missing or
    different pending again. The repair clears ``manifestSha256`` as well: the manifest pass
    skips the upload of an album whose digest equals the recorded one, and the album of an
    event that did not change since it was written has that digest. It only applies to the
    version that was read, still recorded as written with that digest: an event changed since
    is pending already or was written again. A failed check repairs nothing; the first
    connection-level failure ends the sample."""
    events = list(
        db.events.find(WRITTEN_MANIFESTS, {"version": 1, "manifestSha256": 1})
        .sort([("updatedAt", -1), ("_id", 1)])
        .limit(size)
    )
    sample = ManifestSample()
    _check_each(
        blob, events, sample, lambda client, event: _check_manifest(blob, client, event, sample)
    )
    stale = set(sample.missing) | set(sample.different)
    repairs = [
        UpdateOne(
            {
                "_id": e["_id"],
                "version": e["version"],
                "manifestPending": False,
                "manifestSha256": e["manifestSha256"],
            },
            {"$set": {"manifestPending": True}, "$unset": {"manifestSha256": ""}},
        )
        for e in events
        if e["_id"] in stale
    ]
    if repairs:
        sample.repaired = db.events.bulk_write(repairs, ordered=False).modified_count
    return sample


def _check_manifest(blob: BlobStorageResource, client, event: dict, sample: ManifestSample) -> None:
    event_id = event["_id"]
    status = _ask(event_id, lambda: blob.manifest_status(client, event_id))
    if status.status == "missing":
        sample.missing.append(event_id)
    elif status.status == "error":
        sample.errors.append(f"{event_id}: {status.detail}")
    elif status.sha256 != event["manifestSha256"]:
        sample.different.append(event_id)
    else:
        sample.present.append(event_id)


@asset_check(
    asset=events,
    name="event_manifests_exist",
    description=(
        "The manifests of the most recently changed events whose manifest is recorded as "
        "written exist in Blob Storage with the recorded content (sha256). A missing or "
        "different one is made pending again and written again by the check, and "
        "fails the check with a warning; checks that could not answer (auth, outage) are "
        "reported apart and repair nothing."
    ),
)
def event_manifests_exist(
    context: AssetCheckExecutionContext,
    mongo: MongoResource,
    blob: BlobStorageResource,
    settings: PipelineSettings,
) -> AssetCheckResult:
    db = mongo.db()
    sample = sample_manifests(db, blob, settings.manifest_sample_size)
    # Rewritten now, not left to the next run: a quiet pipeline may have none for hours.
    rewritten = write_pending_manifests(db, blob) if sample.repaired else None
    context.log.info(
        "manifest sample: %d events, %d present, %d missing, %d different, %d made pending, "
        "%d not checked (errors), %d skipped (storage unreachable)",
        sample.sampled,
        len(sample.present),
        len(sample.missing),
        len(sample.different),
        sample.repaired,
        len(sample.errors),
        sample.not_checked,
    )
    problems = []
    if sample.unreachable:
        context.log.warning("Blob Storage unreachable: %s", sample.unreachable)
        problems.append(
            f"Blob Storage unreachable ({sample.unreachable}); {sample.not_checked} manifests "
            "not checked"
        )
    if sample.missing:
        problems.append(f"{len(sample.missing)} manifests are missing")
    if sample.different:
        problems.append(f"{len(sample.different)} manifests differ from the recorded digest")
    if sample.missing or sample.different:
        problems.append(f"{sample.repaired} made pending and written again")
    if rewritten is not None and rewritten.storage_error:
        problems.append(f"writing them again failed: {rewritten.storage_error}")
    if sample.errors:
        context.log.warning(
            "%d manifest checks failed without an answer (auth or outage), e.g. %s",
            len(sample.errors),
            sample.errors[0],
        )
        problems.append(f"{len(sample.errors)} manifests could not be checked (see errors)")
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.WARN,
        description="; ".join(problems) or f"{sample.sampled} sampled manifests exist",
        metadata={
            "sampled": sample.sampled,
            "present": len(sample.present),
            "missing": len(sample.missing),
            "different": len(sample.different),
            "repaired": sample.repaired,
            "rewritten": rewritten.manifests_written if rewritten else 0,
            "errors": len(sample.errors),
            "storage_unreachable": sample.unreachable is not None,
            "not_checked": sample.not_checked,
            "missing_examples": MetadataValue.json(sample.missing[:EXAMPLES]),
            "different_examples": MetadataValue.json(sample.different[:EXAMPLES]),
            "error_examples": MetadataValue.json(sample.errors[:EXAMPLES]),
        },
    )


SWEEPER_CHECKS = [
    orphan_photos,
    event_photo_counts,
    tombstone_targets,
    storage_urls_exist,
    event_manifests_exist,
]

# Only these checks: other checks on the same assets belong to the runs that materialise them.
sweeper_job = define_asset_job(
    SWEEPER_JOB_NAME,
    selection=AssetSelection.checks(*SWEEPER_CHECKS),
    description=(
        "The sweeper: heal orphan photos, verify counts, tombstones, stored blobs and manifests."
    ),
    tags={"snapmap/kind": "sweeper"},
)

sweeper_schedule = ScheduleDefinition(
    name="sweeper_schedule",
    job=sweeper_job,
    cron_schedule="*/10 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every 10 minutes; orphans are photos older than orphan_grace_minutes.",
)


def _chunks(ids: Sequence[str] | Iterable[str]) -> Iterator[list[str]]:
    values = list(ids)
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]
