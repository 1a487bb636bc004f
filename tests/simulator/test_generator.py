"""The simulated upload stream: deterministic per seed, sized as configured, and honest about
what each record is (valid messages pass the contract, malformed ones fail it, duplicates are
exact copies, lost photos are never published)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from snapmap_pipeline.clustering.geo import haversine_m
from snapmap_pipeline.contract.storage_url import StorageUrlPolicy
from snapmap_pipeline.contract.validation import InvalidUpload, validate_upload
from snapmap_pipeline.simulator.generator import (
    FESTIVAL_SHARE,
    Malformation,
    RecordKind,
    StreamConfig,
    generate_stream,
    photo_id_prefix,
    records_from_checkins,
    tally,
)

pytestmark = pytest.mark.contract

END = datetime(2026, 1, 17, 18, 30, 15, 123456, tzinfo=UTC)
POLICY = StorageUrlPolicy()
EXPECTED_CODE = {
    Malformation.NOT_JSON: "not_json",
    Malformation.LONGITUDE_190: "schema",
    Malformation.MISSING_TIMESTAMP: "schema",
    Malformation.BAD_STORAGE_URL: "bad_storage_url",
    Malformation.NAIVE_TIMESTAMP: "schema",
}


@pytest.fixture(scope="module")
def day():
    """The default demo day (3,000 photos), generated once for the module."""
    config = StreamConfig(end=END, photos=3000, seed=11)
    return config, list(generate_stream(config))


def metres_between(lon1, lat1, lon2, lat2):
    """Great-circle metres between points in degrees, by the engine's haversine."""
    return haversine_m(*(np.radians(v) for v in (lat1, lon1, lat2, lon2)))


def fingerprint(records):
    return [(r.kind, r.key, r.value, r.publish_at, r.malformation) for r in records]


def test_same_seed_gives_the_same_stream_and_another_seed_does_not():
    config = StreamConfig(end=END, photos=400, seed=5)
    first = fingerprint(generate_stream(config))
    again = fingerprint(generate_stream(config))
    other = fingerprint(generate_stream(StreamConfig(end=END, photos=400, seed=6)))
    assert first == again
    assert first != other
    assert {r[1] for r in first}.isdisjoint({r[1] for r in other})


@pytest.mark.parametrize("photos", [1, 7, 250, 3000])
def test_counts_are_as_configured(photos):
    config = StreamConfig(end=END, photos=photos, seed=2)
    records = list(generate_stream(config))
    kinds = Counter(r.kind for r in records)

    assert kinds[RecordKind.VALID] + kinds[RecordKind.LOST] == photos
    assert kinds[RecordKind.LOST] == config.lost_count == round(photos * 0.003)
    assert kinds[RecordKind.DUPLICATE] == config.duplicate_count == round(photos * 0.005)
    assert kinds[RecordKind.MALFORMED] == config.malformed_count == round(photos * 0.005)
    stored_ids = [r.photo.photo_id for r in records if r.stores_photo]
    assert len(set(stored_ids)) == photos
    assert all(i.startswith(photo_id_prefix(config.seed)) for i in stored_ids)

    counted = tally(records)
    assert counted["photosStored"] == photos
    assert counted["records"] == len(records)
    assert counted["published"] == len(records) - kinds[RecordKind.LOST]


def test_gatherings_have_very_different_sizes(day):
    config, records = day
    counted = tally(records)
    by_gathering = Counter(r.photo.gathering for r in records if r.stores_photo)
    dinners = [n for name, n in by_gathering.items() if name.startswith("dinner-")]
    weddings = [n for name, n in by_gathering.items() if name.startswith("wedding-")]

    assert by_gathering["festival"] == round(config.photos * FESTIVAL_SHARE)
    assert 5.0 <= np.mean(dinners) <= 7.0
    assert all(n >= 100 for n in weddings)
    assert counted["gatherings"]["festival"] == 1
    assert counted["photosByGathering"]["background"] > 0


def test_festival_is_a_dense_crowd_and_dinners_a_table(day):
    _, records = day
    festival = np.array(
        [
            (r.photo.lon, r.photo.lat)
            for r in records
            if r.stores_photo and r.photo.gathering == "festival"
        ]
    )
    centre = festival.mean(axis=0)
    spread = metres_between(centre[0], centre[1], festival[:, 0], festival[:, 1])
    assert np.percentile(spread, 95) < 800

    dinner = [r.photo for r in records if r.stores_photo and r.photo.gathering == "dinner-1"]
    lon = np.array([p.lon for p in dinner])
    lat = np.array([p.lat for p in dinner])
    assert metres_between(lon.mean(), lat.mean(), lon, lat).max() < 30
    minutes = (max(p.taken_at for p in dinner) - min(p.taken_at for p in dinner)) / timedelta(
        minutes=1
    )
    assert minutes <= 90


def test_photos_are_in_the_city_and_the_day(day):
    config, records = day
    photos = [r.photo for r in records if r.stores_photo]
    lon = np.array([p.lon for p in photos])
    lat = np.array([p.lat for p in photos])
    distance = metres_between(config.centre_lon, config.centre_lat, lon, lat)
    assert distance.max() <= config.city_radius_m + 1000

    for record in records:
        if record.stores_photo:
            assert record.photo.taken_at <= record.publish_at
            assert record.publish_at >= config.end - timedelta(days=1)


def test_upload_delays_are_mostly_seconds_some_minutes_a_few_days(day):
    _, records = day
    delays = tally(records)["uploadDelay"]
    total = sum(delays.values())
    assert delays["seconds"] / total > 0.85
    assert 0.03 < delays["minutes"] / total < 0.15
    assert 0 < delays["days"] / total <= 0.02
    late = [
        r for r in records if r.stores_photo and r.publish_at - r.photo.taken_at > timedelta(days=1)
    ]
    assert all(r.publish_at - r.photo.taken_at <= timedelta(days=4, minutes=5) for r in late)


def test_records_come_in_publish_order(day):
    _, records = day
    moments = [r.publish_at for r in records]
    assert moments == sorted(moments)


def test_valid_and_lost_messages_pass_the_contract_exactly(day):
    _, records = day
    for record in records:
        if not record.stores_photo:
            continue
        upload = validate_upload(record.value, POLICY, published_at=record.publish_at)
        assert record.key == upload.photo_id.encode() == record.photo.photo_id.encode()
        assert upload.taken_at == record.photo.taken_at
        assert (upload.lon, upload.lat) == (record.photo.lon, record.photo.lat)
        assert upload.storage_url == f"azure://photos/{record.photo.photo_id}.jpg"
        assert record.photo.taken_at.microsecond % 1000 == 0


def test_malformed_messages_fail_the_contract_with_their_code(day):
    _, records = day
    malformed = [r for r in records if r.kind is RecordKind.MALFORMED]
    assert {r.malformation for r in malformed} == set(Malformation)
    for record in malformed:
        with pytest.raises(InvalidUpload) as rejected:
            validate_upload(record.value, POLICY, published_at=record.publish_at)
        assert rejected.value.code == EXPECTED_CODE[record.malformation], record.value
        assert record.photo is None and not record.stores_photo and record.is_published


def test_bad_storage_url_and_naive_timestamp_are_the_documented_ones(day):
    _, records = day
    by_kind = {r.malformation: r for r in records if r.kind is RecordKind.MALFORMED}
    assert json.loads(by_kind[Malformation.BAD_STORAGE_URL].value)["storageUrl"] == (
        "azure://My_Bucket/x.jpg"
    )
    naive = json.loads(by_kind[Malformation.NAIVE_TIMESTAMP].value)["timestamp"]
    assert datetime.fromisoformat(naive).tzinfo is None
    assert json.loads(by_kind[Malformation.LONGITUDE_190].value)["location"][0] == 190.0
    assert "timestamp" not in json.loads(by_kind[Malformation.MISSING_TIMESTAMP].value)


def test_duplicates_are_exact_copies_of_an_earlier_published_message(day):
    _, records = day
    first_seen = {}
    duplicates = 0
    for position, record in enumerate(records):
        if record.kind is RecordKind.VALID:
            first_seen.setdefault((record.key, record.value), position)
        if record.kind is RecordKind.DUPLICATE:
            duplicates += 1
            assert first_seen.get((record.key, record.value), len(records)) < position
            assert not record.stores_photo
    assert duplicates == 15


def test_lost_photos_are_stored_but_never_published(day):
    _, records = day
    lost = [r for r in records if r.kind is RecordKind.LOST]
    assert len(lost) == 9
    published_values = {r.value for r in records if r.is_published}
    published_keys = {r.key for r in records if r.is_published}
    for record in lost:
        assert not record.is_published and record.stores_photo
        assert record.value not in published_values
        assert record.key not in published_keys


def test_end_is_cut_to_milliseconds_and_must_be_utc():
    assert StreamConfig(end=END).end.microsecond == 123000
    with pytest.raises(ValueError, match="aware UTC"):
        StreamConfig(end=datetime(2026, 1, 17, 18, 0))
    with pytest.raises(ValueError, match="photos"):
        StreamConfig(end=END, photos=0)


def test_a_city_on_the_antimeridian_stays_within_longitude_range():
    config = StreamConfig(end=END, photos=300, seed=4, centre_lon=179.99, centre_lat=-16.5)
    for record in generate_stream(config):
        if record.stores_photo:
            assert -180.0 <= record.photo.lon <= 180.0
            validate_upload(record.value, POLICY, published_at=record.publish_at)


def test_checkins_keep_their_original_timestamp_text():
    rows = [
        ("gowalla-nyc-1", "2009-04-23T22:37:00Z", -73.8454199, 40.7564249),
        ("gowalla-nyc-2", "2009-04-23T22:59:17Z", -73.8470507, 40.7466173),
    ]
    records = list(records_from_checkins(rows))
    assert [json.loads(r.value)["timestamp"] for r in records] == [row[1] for row in rows]
    assert records[0].publish_at == datetime(2009, 4, 23, 22, 37, tzinfo=UTC)
    published = datetime(2026, 1, 17, tzinfo=UTC)
    upload = validate_upload(records[1].value, POLICY, published_at=published)
    assert (upload.lon, upload.lat) == (-73.8470507, 40.7466173)
