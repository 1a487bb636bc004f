"""Validation of ``photo-uploads`` messages against the contract.

The structural contract is the JSON Schema next to this module. What a schema cannot say is
checked here: the byte limit, strict UTF-8 and JSON (no NaN, no duplicate keys), the time rules
and the storageUrl rules. Every rejection carries a stable ``code`` (for dead-letter headers and
metrics) and a one-line ``reason`` a person can act on.

Timestamp policy (cases.md #31, #34): RFC 3339 only, with ``T`` and ``Z`` or an offset
(``+hh:mm`` or ``+hhmm``, at most 14 h). Naive times, a space separator, epoch numbers and leap
seconds are rejected. Fractions are cut to whole milliseconds, the precision MongoDB stores, so
that streaming and reclustering from storage see the same instant. A photo taken before
``EARLIEST_TAKEN_AT`` or more than one day after the message's own Kafka timestamp is rejected
(``timestamp_out_of_range``; the reason names the bound and the times it compared). A message
without a Kafka timestamp is bounded by the time the run read it instead, and its reason says so.

The Kafka timestamp itself orders the messages about one photo (``store/photos.py``), so a
producer-set one (CreateTime) more than ``MAX_PUBLISH_SKEW`` after the moment the run read the
message is not trusted: the message is rejected with ``publish_time_in_future``
(``check_publish_time``). The broker's own time (LogAppendTime) is not checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from snapmap_pipeline.contract.storage_url import StorageUrlError, StorageUrlPolicy

MAX_MESSAGE_BYTES = 64 * 1024
# The earliest takenAt accepted: older times are epoch numbers read with the wrong unit or unset
# clocks (cases.md #34), while photos of the 2000s (early digital cameras, old albums uploaded
# today) are real. It is also the first day of the daily_events partitions (assets/backfill.py),
# so every accepted photo's day can be backfilled from the UI. The schema's timestamp
# description states it for producers.
EARLIEST_TAKEN_AT = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE_SKEW = timedelta(days=1)
# Producer clocks ahead of the pipeline's by more than this are broken, not skewed (Kafka 4.0
# rejects such timestamps by default: message.timestamp.after.max.ms = 1 hour).
MAX_PUBLISH_SKEW = timedelta(hours=1)
PUBLISH_TIME_IN_FUTURE = "publish_time_in_future"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
MAX_UTC_OFFSET = timedelta(hours=14)

_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|([+-])(\d{2}):?(\d{2}))$"
)
KNOWN_FIELDS = ("photoId", "timestamp", "location", "storageUrl")
# Arrays and objects may nest this deep, the message's own object included. Python's parser
# gives up at the interpreter's recursion limit, which the caller's frames already use up, so
# without a limit of its own a message nested some hundreds deep would be accepted or rejected
# depending on how deep the validating call was made.
MAX_NESTING = 64
# A JSON string (skipped, so that its brackets do not count), or one bracket.
_NESTING_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class InvalidUpload(ValueError):
    """A message that breaks the contract. ``code`` is stable; ``reason`` is for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class PhotoUpload:
    """A valid upload message. ``taken_at`` is aware UTC with millisecond precision."""

    photo_id: str
    taken_at: datetime
    lon: float
    lat: float
    storage_url: str
    extra: dict[str, Any] = field(default_factory=dict)


@cache
def schema() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("photo-upload.schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


def _reject_constant(name: str) -> float:
    raise InvalidUpload("not_json", f"JSON constant {name} is not allowed")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidUpload("duplicate_key", f"key {key[:40]!r} appears more than once")
        result[key] = value
    return result


def parse_timestamp(
    text: str, reference: datetime | None = None, read_at: datetime | None = None
) -> datetime:
    """Parse an RFC 3339 timestamp to aware UTC, cut to milliseconds, within the time guards.

    ``reference`` is the message's own time (its Kafka timestamp); photos more than a day after
    it are rejected. A message without one is held to ``read_at``, when the run read it, the
    same way. Without either, only the lower bound applies.
    """
    match = _TIMESTAMP.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidUpload(
            "bad_timestamp",
            "timestamp must be RFC 3339 like 2026-01-17T13:20:00Z or with a UTC offset",
        )
    year, month, day, hour, minute, second, fraction, zone, sign, off_h, off_m = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    micros -= micros % 1000
    try:
        offset = timedelta(0)
        if zone != "Z":
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            if int(off_m) >= 60 or offset > MAX_UTC_OFFSET:
                raise ValueError(f"UTC offset {zone} out of range")
            offset = -offset if sign == "-" else offset
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros
        )
    except ValueError as error:
        raise InvalidUpload("bad_timestamp", f"timestamp {text[:40]!r}: {error}") from None
    try:
        taken_at = (local - offset).replace(tzinfo=UTC)
    except OverflowError:
        raise InvalidUpload("bad_timestamp", f"timestamp {text[:40]!r} is out of range") from None

    # The reasons name the bound that failed and what it was computed from: a producer whose
    # clock is behind stamps every message too early, and only the Kafka timestamp in the
    # reason tells that apart from a photo whose own time is wrong.
    photo = text if text.endswith("Z") else f"{text} ({_instant(taken_at)})"
    if taken_at < EARLIEST_TAKEN_AT:
        raise InvalidUpload(
            TIMESTAMP_OUT_OF_RANGE,
            f"timestamp {photo} is before the lower bound {_instant(EARLIEST_TAKEN_AT)}, the "
            "earliest time a photo is accepted",
        )
    if reference is not None:
        _check_upper_bound(
            photo,
            taken_at,
            reference,
            "the message's Kafka timestamp",
            "if the photo's time is right, the producer's clock is behind",
        )
    elif read_at is not None:
        _check_upper_bound(
            photo,
            taken_at,
            read_at,
            "the time the message was read",
            "the message has no Kafka timestamp",
        )
    return taken_at


def _check_upper_bound(
    photo: str, taken_at: datetime, reference: datetime, named: str, advice: str
) -> None:
    """Reject ``taken_at`` more than ``MAX_FUTURE_SKEW`` after ``reference`` (``named`` in the
    reason, followed by ``advice``)."""
    if taken_at > reference + MAX_FUTURE_SKEW:
        ahead = str(timedelta(seconds=int((taken_at - reference).total_seconds())))
        raise InvalidUpload(
            TIMESTAMP_OUT_OF_RANGE,
            f"timestamp {photo} is more than a day after {named} {_instant(reference)} "
            f"({ahead.replace(',', '')} after; upper bound "
            f"{_instant(reference + MAX_FUTURE_SKEW)}); {advice}",
        )


def _instant(moment: datetime) -> str:
    """An aware time as RFC 3339 UTC with ``Z``, milliseconds only when it has some."""
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.astimezone(UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def check_publish_time(published_at: datetime | None, read_at: datetime) -> None:
    """Reject a producer-set Kafka timestamp more than ``MAX_PUBLISH_SKEW`` after ``read_at``
    (when the run read the message; both aware). Such a message would win over every later
    message about its photo, and its photo would look uploaded in the future."""
    if published_at is not None and published_at > read_at + MAX_PUBLISH_SKEW:
        raise InvalidUpload(
            PUBLISH_TIME_IN_FUTURE,
            f"Kafka timestamp {published_at.isoformat()} is more than an hour after the "
            f"message was read ({read_at.isoformat(timespec='seconds')}); the producer set a "
            "wrong time",
        )


def validate_upload(
    raw: bytes | None,
    policy: StorageUrlPolicy,
    published_at: datetime | None = None,
    read_at: datetime | None = None,
) -> PhotoUpload:
    """Turn the raw bytes of one message into a ``PhotoUpload`` or raise ``InvalidUpload``.

    ``published_at`` is the message's Kafka timestamp, None when it has none; ``read_at``, when
    the run read it, then bounds the photo's time instead (``parse_timestamp``).

    Nothing else escapes: an input that makes parsing itself fail (an overflow, nesting past
    the recursion limit, an integer past Python's digit limit) is that message's fault and is
    rejected like any other, never an error that fails the run and blocks its partition.
    """
    try:
        return _validate(raw, policy, published_at, read_at)
    except InvalidUpload:
        raise
    except (ArithmeticError, ValueError, RecursionError, TypeError) as error:
        reason = f"message cannot be parsed: {type(error).__name__}: {error}"
        raise InvalidUpload("unparseable", _short(reason)) from None


def _validate(
    raw: bytes | None,
    policy: StorageUrlPolicy,
    published_at: datetime | None,
    read_at: datetime | None,
) -> PhotoUpload:
    if raw is None or len(raw) == 0:
        raise InvalidUpload("empty", "message has no value")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidUpload("too_large", f"message is {len(raw)} bytes; the limit is 65536")
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        raise InvalidUpload("not_utf8", f"invalid UTF-8 at byte {error.start}") from None
    if _nests_deeper_than(text, MAX_NESTING):
        raise InvalidUpload("not_json", f"arrays or objects nested deeper than {MAX_NESTING}")
    try:
        document = json.loads(
            text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as error:
        raise InvalidUpload("not_json", f"not JSON: {error.msg} at char {error.pos}") from None
    except InvalidUpload:
        raise  # from the hooks: a duplicate key, NaN or Infinity
    except (ValueError, RecursionError) as error:
        # Integers past Python's digit limit; arrays or objects nested past the recursion limit.
        reason = f"not JSON this pipeline accepts: {type(error).__name__}: {error}"
        raise InvalidUpload("not_json", _short(reason)) from None
    if not isinstance(document, dict):
        raise InvalidUpload("not_object", f"message is a JSON {type(document).__name__}")

    error = best_match(_validator().iter_errors(document))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "message"
        raise InvalidUpload("schema", f"{where}: {_short(error.message)}")
    # The schema's patterns end in "$", which in Python's re (unlike ECMA 262, the dialect of
    # JSON Schema) also matches before a final newline.
    for where, text in (
        *((f"field name {k[:40]!r}", k) for k in document),
        *((k, document[k]) for k in ("photoId", "timestamp", "storageUrl")),
    ):
        if text.endswith("\n"):
            raise InvalidUpload("schema", f"{where}: ends with a newline")

    taken_at = parse_timestamp(document["timestamp"], published_at, read_at)
    try:
        policy.parse(document["storageUrl"])
    except StorageUrlError as bad_url:
        raise InvalidUpload("bad_storage_url", str(bad_url)) from None

    lon, lat = (float(v) for v in document["location"])
    extra = {k: v for k, v in document.items() if k not in KNOWN_FIELDS}
    return PhotoUpload(document["photoId"], taken_at, lon, lat, document["storageUrl"], extra)


def _nests_deeper_than(text: str, limit: int) -> bool:
    """Whether the arrays and objects of JSON ``text`` nest more than ``limit`` deep (text
    that is not JSON may be answered either way: the parser rejects it next)."""
    depth = 0
    for token in _NESTING_TOKEN.finditer(text):
        bracket = token.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif bracket in ("]", "}"):
            depth -= 1
    return False


def _short(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
