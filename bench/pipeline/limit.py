"""The ceiling (issue 7, part 1): how fast plain confluent-kafka reads the upload topic and how
fast pymongo bulk-writes and reads the documents the pipeline must write, on the same stack and
in the same run. No Dagster, no validation, no clustering.

Per repetition, on fresh topics and a fresh database:

- ``consume``: a plain ``Consumer`` assigned to every partition from the start reads all
  messages in batches of 1,000 and parses each with ``json.loads``;
- ``photo_upsert``: ``UpdateOne(upsert)`` per photo, the fields the pipeline stores, in
  unordered bulks of 1,000;
- ``event_upsert``: one event document per event of the canonical result, same bulks;
- ``photo_link``: ``UpdateOne`` setting ``eventId`` on every photo, same bulks;
- ``photo_read``: every photo back by a ``takenAt`` range with the clustering projection,
  sorted, in chunks (what a backfill reads).

The streaming limit is the time of consume + photo upsert + event upsert + photo link for the
stream (photos/s); the backfill limit is photo read + event upsert + photo link for the stored
day. Run: ``python -m bench.pipeline.limit --photos 20000 --repeat 3``.
"""

from __future__ import annotations

import argparse
import json
import time

from confluent_kafka import Consumer, TopicPartition
from pymongo import UpdateOne

from bench.pipeline.common import (
    emit,
    env,
    event_upserts,
    isolated_stack,
    machine,
    median,
    upload_records,
)
from snapmap_pipeline.clustering import ClusterParams, PhotoPoint, canonical_pass
from snapmap_pipeline.contract.validation import parse_timestamp
from snapmap_pipeline.store.geocell import cell_of

BULK = 1000


def publish(kafka, topic: str, values: list[bytes], keys: list[bytes]) -> float:
    started = time.perf_counter()
    kafka.send(topic, [(k, v, []) for k, v in zip(keys, values, strict=True)])
    return time.perf_counter() - started


def consume_all(topic: str, partitions: int, expected: int) -> tuple[float, list[dict]]:
    consumer = Consumer(
        {
            "bootstrap.servers": env("KAFKA_BOOTSTRAP_SERVERS"),
            "group.id": f"{topic}-limit",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    parsed: list[dict] = []
    started = time.perf_counter()
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen = 0
    while seen < expected:
        for message in consumer.consume(num_messages=BULK, timeout=1.0):
            if message.error() is not None:
                raise RuntimeError(str(message.error()))
            seen += 1
            try:
                parsed.append(json.loads(message.value()))
            except ValueError:
                pass  # malformed records of the stream: read, not stored
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed, parsed


def photo_documents(parsed: list[dict]) -> list[dict]:
    """The photo fields the pipeline stores, from parsed messages that carry them."""
    photos = {}
    for body in parsed:
        try:
            lon, lat = body["location"]
            taken = parse_timestamp(body["timestamp"])
            photo_id = body["photoId"]
        except (KeyError, TypeError, ValueError):
            continue
        if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
            continue
        photos[photo_id] = {
            "_id": photo_id,
            "location": {"type": "Point", "coordinates": [lon, lat]},
            "cell": cell_of(lon, lat),
            "takenAt": taken,
            "storageUrl": body.get("storageUrl"),
        }
    return list(photos.values())


def bulk(collection, requests: list) -> float:
    started = time.perf_counter()
    for start in range(0, len(requests), BULK):
        collection.bulk_write(requests[start : start + BULK], ordered=False)
    return time.perf_counter() - started


def read_back(collection, chunk: int = 50_000) -> tuple[float, int]:
    started = time.perf_counter()
    count = 0
    after = None
    while True:
        query = {} if after is None else {"takenAt": {"$gt": after}}
        documents = list(
            collection.find(query, {"location": 1, "takenAt": 1, "eventId": 1, "cell": 1})
            .sort("takenAt", 1)
            .limit(chunk)
        )
        count += len(documents)
        if len(documents) < chunk:
            return time.perf_counter() - started, count
        after = documents[-1]["takenAt"]


def one_run(photos: int, seed: int) -> dict:
    records = upload_records(photos, seed)
    with isolated_stack() as stack:
        topic = stack.settings.uploads_topic
        values, keys = [r.value for r in records], [r.key for r in records]
        publish_s = publish(stack.kafka, topic, values, keys)
        consume_s, parsed = consume_all(topic, stack.topics[topic], len(records))
        documents = photo_documents(parsed)
        db = stack.mongo.db()

        upserts = [
            UpdateOne(
                {"_id": d["_id"]},
                {
                    "$set": {k: v for k, v in d.items() if k != "_id"},
                    "$setOnInsert": {"eventId": None},
                },
                upsert=True,
            )
            for d in documents
        ]
        upsert_s = bulk(db.photos, upserts)

        points = [
            PhotoPoint(d["_id"], d["takenAt"], *d["location"]["coordinates"]) for d in documents
        ]
        result = canonical_pass(points, ClusterParams())
        events = event_upserts(result)
        event_s = bulk(db.events, events)
        links = [
            UpdateOne({"_id": photo_id}, {"$set": {"eventId": event_id}})
            for photo_id, event_id in result.assignment.items()
        ]
        link_s = bulk(db.photos, links)
        read_s, read_n = read_back(db.photos)

    n = len(documents)
    stream_s = consume_s + upsert_s + event_s + link_s
    backfill_s = read_s + event_s + link_s
    return {
        "messages": len(records),
        "photos": n,
        "events": len(events),
        "publish_per_s": len(records) / publish_s,
        "consume_parse_per_s": len(records) / consume_s,
        "photo_upsert_per_s": n / upsert_s,
        "event_upsert_per_s": len(events) / event_s,
        "photo_link_per_s": n / link_s,
        "photo_read_per_s": read_n / read_s,
        "stream_limit_photos_per_s": n / stream_s,
        "backfill_limit_photos_per_s": n / backfill_s,
        "seconds": {
            "consume": consume_s,
            "photo_upsert": upsert_s,
            "event_upsert": event_s,
            "photo_link": link_s,
            "photo_read": read_s,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    before = machine()
    runs = []
    for index in range(args.repeat):
        run = one_run(args.photos, args.seed + index)
        print(json.dumps({"run": index + 1, **run}, default=str), flush=True)
        runs.append(run)
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    emit(
        "limit",
        {
            "command": f"python -m bench.pipeline.limit --photos {args.photos} "
            f"--repeat {args.repeat} --seed {args.seed}",
            "machine_before": before,
            "machine_after": machine(),
            "median": {k: round(median([r[k] for r in runs]), 1) for k in keys},
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
