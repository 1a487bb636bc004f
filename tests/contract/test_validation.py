"""The upload contract: every hostile or malformed kind is rejected with its code, valid
messages parse exactly, and the JSON Schema in the repo agrees with the validator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from jsonschema import Draft202012Validator

from snapmap_pipeline.contract.storage_url import StorageUrlError, StorageUrlPolicy
from snapmap_pipeline.contract.validation import (
    EARLIEST_TAKEN_AT,
    MAX_PUBLISH_SKEW,
    InvalidUpload,
    check_publish_time,
    parse_timestamp,
    schema,
    validate_upload,
)

pytestmark = pytest.mark.contract

POLICY = StorageUrlPolicy(
    account_name="snapmapprod", emulator_endpoint="http://127.0.0.1:30000/devstoreaccount1"
)
PUBLISHED = datetime(2026, 1, 17, 13, 25, tzinfo=UTC)
GOOD = {
    "photoId": "abc123",
    "timestamp": "2026-01-17T13:20:00Z",
    "location": [81.772379, 25.4301623],
    "storageUrl": "azure://bucket/photo.jpg",
}


def message(**changes) -> bytes:
    body = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            body.pop(key)
        else:
            body[key] = value
    return json.dumps(body).encode()


def test_valid_message_parses_with_extras_kept():
    upload = validate_upload(message(device="pixel", albumHint=3), POLICY, PUBLISHED)
    assert upload.photo_id == "abc123"
    assert upload.taken_at == datetime(2026, 1, 17, 13, 20, tzinfo=UTC)
    assert (upload.lon, upload.lat) == (81.772379, 25.4301623)
    assert upload.extra == {"device": "pixel", "albumHint": 3}


HOSTILE = {
    "not json": (b"{not json", "not_json"),
    "truncated json": (b'{"photoId": "a"', "not_json"),
    "json array": (b"[1, 2]", "not_object"),
    "json string": (b'"photo"', "not_object"),
    "json null": (b"null", "not_object"),
    "empty value": (b"", "empty"),
    "invalid utf-8": (b'{"photoId": "\xff\xfe"}', "not_utf8"),
    "over size limit": (message(pad="x" * 70_000), "too_large"),
    "NaN literal": (message().replace(b"81.772379", b"NaN"), "not_json"),
    "Infinity literal": (message().replace(b"81.772379", b"Infinity"), "not_json"),
    "huge exponent": (message().replace(b"81.772379", b"1e400"), "schema"),
    "duplicate key": (b'{"photoId":"a","photoId":"b"}', "duplicate_key"),
    "missing photoId": (message(photoId=...), "schema"),
    "missing timestamp": (message(timestamp=...), "schema"),
    "missing location": (message(location=...), "schema"),
    "missing storageUrl": (message(storageUrl=...), "schema"),
    "null photoId": (message(photoId=None), "schema"),
    "numeric photoId": (message(photoId=123), "schema"),
    "operator object id": (message(photoId={"$gt": ""}), "schema"),
    "operator ne id": (message(photoId={"$ne": None}), "schema"),
    "array id": (message(photoId=["a"]), "schema"),
    "empty id": (message(photoId=""), "schema"),
    "over-long id": (message(photoId="a" * 129), "schema"),
    "id with control char": (message(photoId="a\nb"), "schema"),
    "id starting with $": (message(photoId="$where"), "schema"),
    "id starting with dot": (message(photoId=".hidden"), "schema"),
    "id with slash": (message(photoId="a/../b"), "schema"),
    "location empty": (message(location=[]), "schema"),
    "location nulls": (message(location=[None, None]), "schema"),
    "location one value": (message(location=[81.77]), "schema"),
    "location three values": (message(location=[81.77, 25.43, 10]), "schema"),
    "location four values": (message(location=[81.77, 25.43, 10, 5]), "schema"),
    "location strings": (message(location=["81.772379", "25.4301623"]), "schema"),
    "location object": (message(location={"lat": 25.43, "lon": 81.77}), "schema"),
    "location booleans": (message(location=[True, False]), "schema"),
    "longitude 190": (message(location=[190.0, 25.43]), "schema"),
    "latitude 95": (message(location=[81.77, 95.0]), "schema"),
    "swapped beyond range": (message(location=[25.43, 181.77]), "schema"),
    "timestamp without zone": (message(timestamp="2026-01-17T13:20:00"), "schema"),
    "timestamp space separator": (message(timestamp="2026-01-17 13:20:00Z"), "schema"),
    "timestamp day first": (message(timestamp="17/01/2026 13:20"), "schema"),
    "epoch seconds": (message(timestamp=1768656000), "schema"),
    "epoch millis": (message(timestamp=1768656000000), "schema"),
    "epoch millis string": (message(timestamp="1768656000000"), "schema"),
    "leap second": (message(timestamp="2016-12-31T23:59:60Z"), "bad_timestamp"),
    "month 13": (message(timestamp="2026-13-01T00:00:00Z"), "bad_timestamp"),
    "offset +25:00": (message(timestamp="2026-01-17T13:20:00+25:00"), "bad_timestamp"),
    "offset minutes 75": (message(timestamp="2026-01-17T13:20:00+01:75"), "bad_timestamp"),
    "far future": (message(timestamp="2099-01-01T00:00:00Z"), "timestamp_out_of_range"),
    "before 2000": (message(timestamp="1989-06-01T00:00:00Z"), "timestamp_out_of_range"),
    "epoch zero": (message(timestamp="1970-01-01T00:00:00Z"), "timestamp_out_of_range"),
    "file scheme": (message(storageUrl="file:///etc/passwd"), "bad_storage_url"),
    "http other host": (message(storageUrl="http://evil.example/a.jpg"), "bad_storage_url"),
    "https other account": (
        message(storageUrl="https://other.blob.core.windows.net/bucket/a.jpg"),
        "bad_storage_url",
    ),
    "dot-dot segment": (message(storageUrl="azure://bucket/../secrets/a.jpg"), "bad_storage_url"),
    "encoded traversal": (message(storageUrl="azure://bucket/%2e%2e/a.jpg"), "bad_storage_url"),
    "backslash traversal": (message(storageUrl="azure://bucket/..\\a.jpg"), "bad_storage_url"),
    "SAS query": (
        message(
            storageUrl="https://snapmapprod.blob.core.windows.net/bucket/a.jpg?sv=2022-11-02"
            "&se=2020-01-01T00:00:00Z&sr=b&sp=r&sig=x"
        ),
        "bad_storage_url",
    ),
    "over-long url": (message(storageUrl="azure://bucket/" + "a" * 2100), "schema"),
    "url not a string": (message(storageUrl=["azure://bucket/a.jpg"]), "schema"),
    "uppercase container": (message(storageUrl="azure://Photos/a.jpg"), "bad_storage_url"),
    "underscore container": (message(storageUrl="azure://my_bucket/a.jpg"), "bad_storage_url"),
    "short container": (message(storageUrl="azure://ab/a.jpg"), "bad_storage_url"),
    "double dash container": (message(storageUrl="azure://a--b/a.jpg"), "bad_storage_url"),
    "credentials in url": (
        message(storageUrl="https://u:p@snapmapprod.blob.core.windows.net/bucket/a.jpg"),
        "bad_storage_url",
    ),
    "many extra fields": (
        json.dumps(GOOD | {f"f{i}": i for i in range(500)}).encode(),
        "schema",
    ),
    "extra key with dollar": (message(**{"$where": "1"}), "schema"),
    # Inputs that once crashed the validator (and so blocked their partition) instead of being
    # rejected: datetime overflow on either end, nesting past the recursion limit, integers
    # past Python's digit limit, and "$" matching before a trailing newline.
    "timestamp overflows year 9999": (
        message(timestamp="9999-12-31T23:59:59-14:00"),
        "bad_timestamp",
    ),
    "timestamp underflows year 1": (
        message(timestamp="0001-01-01T00:00:00+01:00"),
        "bad_timestamp",
    ),
    "deep nesting": (b"[" * 30_000 + b"]" * 30_000, "not_json"),
    "deep nesting in extra field": (
        message()[:-1] + b', "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        "not_json",
    ),
    "5000-digit extra field": (message()[:-1] + b', "n": ' + b"9" * 5000 + b"}", "not_json"),
    "5000-digit longitude": (
        message().replace(b"81.772379", b"9" * 5000),
        "not_json",
    ),
    "photo id with trailing newline": (message(photoId="abc\n"), "schema"),
    "timestamp with trailing newline": (message(timestamp="2026-01-17T13:20:00Z\n"), "schema"),
    "field name with trailing newline": (message(**{"device\n": 1}), "schema"),
}


@pytest.mark.parametrize("raw, code", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_message_rejected_with_its_code(raw: bytes, code: str):
    with pytest.raises(InvalidUpload) as rejected:
        validate_upload(raw, POLICY, PUBLISHED)
    assert rejected.value.code == code
    assert rejected.value.reason
    assert len(rejected.value.reason) < 300


def test_at_least_forty_hostile_kinds():
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-01-17T13:20:00Z", datetime(2026, 1, 17, 13, 20, tzinfo=UTC)),
        ("2026-01-17T13:20:00.123Z", datetime(2026, 1, 17, 13, 20, 0, 123000, tzinfo=UTC)),
        ("2026-01-17T14:20:00+01:00", datetime(2026, 1, 17, 13, 20, tzinfo=UTC)),
        ("2026-01-17T13:20:00+0000", datetime(2026, 1, 17, 13, 20, tzinfo=UTC)),
        ("2026-01-17T13:20:00.1234567Z", datetime(2026, 1, 17, 13, 20, 0, 123000, tzinfo=UTC)),
        ("2026-01-17T09:20:00-04:00", datetime(2026, 1, 17, 13, 20, tzinfo=UTC)),
    ],
)
def test_timestamp_forms_parse_to_the_same_utc_instant(text, expected):
    assert parse_timestamp(text, PUBLISHED) == expected


def test_future_guard_is_relative_to_the_message_not_the_wall_clock():
    old_publish = datetime(2019, 5, 1, tzinfo=UTC)
    assert parse_timestamp("2019-05-01T12:00:00Z", old_publish).year == 2019
    with pytest.raises(InvalidUpload, match="more than a day after"):
        parse_timestamp("2019-05-03T00:00:01Z", old_publish)


def test_a_producer_clock_behind_is_named_in_the_reason():
    """A producer whose clock is a month behind stamps each message a month before its photo.
    The code stays ``timestamp_out_of_range``; the reason names the bound that failed, the
    photo's time and the Kafka timestamp the bound comes from, so the dead letter alone points
    at the producer's clock."""
    behind = PUBLISHED - timedelta(days=31)
    with pytest.raises(InvalidUpload) as rejected:
        validate_upload(message(timestamp="2026-01-17T14:20:00+01:00"), POLICY, behind)
    assert rejected.value.code == "timestamp_out_of_range"
    reason = rejected.value.reason
    assert reason == (
        "timestamp 2026-01-17T14:20:00+01:00 (2026-01-17T13:20:00Z) is more than a day after the "
        "message's Kafka timestamp 2025-12-17T13:25:00Z (30 days 23:55:00 after; upper bound "
        "2025-12-18T13:25:00Z); if the photo's time is right, the producer's clock is behind"
    )
    longest = "2026-01-17T14:20:00.123456789+01:00"
    with pytest.raises(InvalidUpload) as rejected:
        validate_upload(message(timestamp=longest), POLICY, behind - timedelta(milliseconds=1))
    assert len(rejected.value.reason) < 300


def test_a_message_without_a_kafka_timestamp_is_bounded_by_the_time_it_was_read():
    """Without a Kafka timestamp the upper bound is a day after the run read the message, and
    the reason names that reference and why it was used. A Kafka timestamp, when there is one,
    stays the reference, however long after it the message is read."""
    read_at = PUBLISHED + timedelta(minutes=5)
    assert validate_upload(message(), POLICY, None, read_at).photo_id == "abc123"
    with pytest.raises(InvalidUpload) as rejected:
        validate_upload(message(timestamp="9999-12-31T00:00:00Z"), POLICY, None, read_at)
    assert rejected.value.code == "timestamp_out_of_range"
    assert rejected.value.reason == (
        "timestamp 9999-12-31T00:00:00Z is more than a day after the time the message was read "
        "2026-01-17T13:30:00Z (2912425 days 10:30:00 after; upper bound 2026-01-18T13:30:00Z); "
        "the message has no Kafka timestamp"
    )
    with pytest.raises(InvalidUpload, match="after the message's Kafka timestamp"):
        validate_upload(message(timestamp="2026-01-19T00:00:00Z"), POLICY, PUBLISHED, read_at)
    late_read = PUBLISHED + timedelta(days=30)
    assert validate_upload(message(), POLICY, PUBLISHED, late_read).photo_id == "abc123"


def test_a_photo_before_the_earliest_names_the_lower_bound():
    """Written with an offset, 1999-12-31T23:00Z reads as 2000: the reason gives the UTC
    instant beside the text, and names the lower bound."""
    with pytest.raises(InvalidUpload) as rejected:
        validate_upload(message(timestamp="2000-01-01T01:00:00+02:00"), POLICY, PUBLISHED)
    assert rejected.value.code == "timestamp_out_of_range"
    assert rejected.value.reason == (
        "timestamp 2000-01-01T01:00:00+02:00 (1999-12-31T23:00:00Z) is before the lower bound "
        "2000-01-01T00:00:00Z, the earliest time a photo is accepted"
    )


def test_a_publish_time_within_the_skew_of_the_read_is_trusted():
    read_at = datetime(2026, 5, 1, 13, 0, tzinfo=UTC)
    check_publish_time(read_at + MAX_PUBLISH_SKEW, read_at)
    check_publish_time(datetime(2019, 5, 1, tzinfo=UTC), read_at)  # an old range re-read
    check_publish_time(None, read_at)


@pytest.mark.parametrize("ahead", [MAX_PUBLISH_SKEW + timedelta(milliseconds=1), timedelta(days=1)])
def test_a_publish_time_further_ahead_of_the_read_is_rejected(ahead):
    read_at = datetime(2026, 5, 1, 13, 0, tzinfo=UTC)
    with pytest.raises(InvalidUpload, match="more than an hour after") as rejected:
        check_publish_time(read_at + ahead, read_at)
    assert rejected.value.code == "publish_time_in_future"


def test_the_takenat_guard_alone_lets_a_message_stamped_in_2100_through():
    """Why the publish time needs its own guard: the takenAt guard is relative to it."""
    stamped = datetime(2100, 1, 1, tzinfo=UTC)
    assert validate_upload(message(), POLICY, stamped).photo_id == "abc123"
    with pytest.raises(InvalidUpload, match="publish_time_in_future"):
        check_publish_time(stamped, datetime(2026, 5, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    "url, container, blob",
    [
        ("azure://bucket/a.jpg", "bucket", "a.jpg"),
        ("azure://photos-2026/user/7/a b.jpg", "photos-2026", "user/7/a b.jpg"),
        ("https://snapmapprod.blob.core.windows.net/bucket/x/y.jpg", "bucket", "x/y.jpg"),
        ("http://127.0.0.1:30000/devstoreaccount1/bucket/a.jpg", "bucket", "a.jpg"),
    ],
)
def test_accepted_storage_urls(url, container, blob):
    location = POLICY.parse(url)
    assert (location.container, location.blob_name) == (container, blob)


def test_emulator_url_rejected_when_no_emulator_is_configured():
    with pytest.raises(StorageUrlError, match="not allowed"):
        StorageUrlPolicy(account_name="snapmapprod").parse(
            "http://127.0.0.1:30000/devstoreaccount1/bucket/a.jpg"
        )


def test_schema_file_is_valid_and_agrees_on_a_good_message():
    Draft202012Validator.check_schema(schema())
    assert Draft202012Validator(schema()).is_valid(GOOD)
    assert not Draft202012Validator(schema()).is_valid(GOOD | {"location": [190, 0]})


def test_schema_states_the_validators_earliest_timestamp():
    """Producers read the schema, not the validator: its timestamp description names the
    bound the validator enforces (``EARLIEST_TAKEN_AT``, also the first daily partition)."""
    description = schema()["properties"]["timestamp"]["description"]
    assert EARLIEST_TAKEN_AT.strftime("%Y-%m-%dT%H:%M:%SZ") in description


def _at_depth(frames: int, call):
    """``call()`` made ``frames`` Python calls deeper than here."""
    return call() if frames == 0 else _at_depth(frames - 1, call)


def _outcome(raw: bytes) -> str:
    try:
        validate_upload(raw, POLICY, PUBLISHED)
    except InvalidUpload as invalid:
        return invalid.code
    return "accepted"


@pytest.mark.parametrize("depth", [65, 300, 900])
def test_nesting_is_judged_the_same_whatever_the_callers_stack(depth):
    """How deep a message nests decides whether it is accepted, never how deep the caller's
    own stack is: Python's parser gives up at its recursion limit, which the frames already on
    the stack use up, so a message nested 900 deep was accepted when called near the top and
    rejected when called from 300 frames down (where a run's steps are)."""
    nested = message()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    outcomes = {frames: _at_depth(frames, lambda: _outcome(nested)) for frames in (0, 300)}
    assert outcomes == {0: "not_json", 300: "not_json"}


def test_nesting_up_to_the_limit_is_accepted():
    nested = message()[:-1] + b', "x": ' + b'{"a": [' * 31 + b"1" + b"]}" * 31 + b"}"
    assert _at_depth(300, lambda: _outcome(nested)) == "accepted"
