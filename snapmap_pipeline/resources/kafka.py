"""Kafka resource: bounded, explicit-offset access to the broker for sensors and runs.

Offsets are never stored or committed implicitly: consumers are created with auto-commit and
the automatic offset store off, read by ``assign`` + explicit offsets, and the consumer group's
offset moves only through ``commit_offset`` after a run has applied its batch
(cases.md #13, #14, #15). Every call has a timeout; a broker that does not answer raises
``KafkaUnavailable`` instead of hanging (cases.md #21).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

T = TypeVar("T")
_log = logging.getLogger(__name__)

# librdkafka's value for "no offset committed for this group and partition".
_OFFSET_INVALID = -1001

# The group coordinator is moving or loading (a broker restart, a leader change of the offsets
# topic): it answers again within seconds, so these get ``coordinator_retry_s``, not
# ``timeout_s``.
COORDINATOR_ERRORS = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError._WAIT_COORD,
    }
)


class LibrdkafkaLog:
    """Where librdkafka's own log lines go: the ``snapmap_pipeline.librdkafka`` logger, with
    the connection noise of an outage condensed.

    While a broker is down every client retries its connection every second or so and
    librdkafka reports each refusal (and "all brokers are down") at ERROR: hundreds of lines per
    outage. The first such line for a broker is logged as a WARNING saying that repeats are
    held back; repeats within ``window_s`` are counted, and the next one after the window
    reports the count. Every other line keeps its level, so real errors stay visible.
    """

    _CONNECTION_NOISE = re.compile(
        r"Connection refused|Connect to .* failed|brokers are down|Disconnected"
        r"|Connection setup timed out|Receive failed: Connection reset",
        re.IGNORECASE,
    )
    _BROKER = re.compile(r"([\w.\-]+:\d+)/(?:bootstrap|\d+)")

    def __init__(self, logger: logging.Logger, window_s: float = 60.0) -> None:
        self.logger = logger
        self.window_s = window_s
        self._lock = threading.Lock()
        # broker address -> (start of the current window, lines held back in it)
        self._held: dict[str, tuple[float, int]] = {}

    def log(self, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        if not self._CONNECTION_NOISE.search(text):
            self.logger.log(level, "%s", text)
            return
        found = self._BROKER.search(text)
        broker = found.group(1) if found else "brokers"
        now = time.monotonic()
        with self._lock:
            started, held = self._held.get(broker, (None, 0))
            if started is not None and now - started < self.window_s:
                self._held[broker] = (started, held + 1)
                return
            self._held[broker] = (now, 0)
        if held:
            self.logger.warning(
                "%s (%d more connection failures to %s in the last %.0f s)",
                text,
                held,
                broker,
                now - started,
            )
        else:
            self.logger.warning(
                "%s (connection failures to %s are logged once per %.0f s while they last)",
                text,
                broker,
                self.window_s,
            )


_LIBRDKAFKA_LOG = LibrdkafkaLog(logging.getLogger("snapmap_pipeline.librdkafka"))


class KafkaUnavailable(RuntimeError):
    """The broker did not answer within the configured timeout."""


class TopicRecreated(RuntimeError):
    """The topic an offset range was planned on was deleted and a topic of the same name
    created: its offsets now name other messages, and the range's own messages are gone."""


class TopicMissing(KafkaUnavailable):
    """The broker answered that the topic does not exist (deleted, never created)."""


@dataclass(frozen=True)
class OffsetRange:
    """Offsets ``first`` to ``last`` inclusive of one topic partition: one micro-batch.

    ``topic_id`` is the broker's id of the topic (it changes when a topic is deleted and
    created again under the same name); None for ranges planned before ids were recorded."""

    topic: str
    partition: int
    first: int
    last: int
    topic_id: str | None = None

    @property
    def key(self) -> str:
        """``topic/partition/first-last``, then ``@topic_id`` when the id is known, so that
        the same offsets of a recreated topic are another run key and another batch."""
        plain = f"{self.topic}/{self.partition}/{self.first}-{self.last}"
        return plain if self.topic_id is None else f"{plain}@{self.topic_id}"

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Watermarks:
    low: int
    high: int


class KafkaResource(ConfigurableResource):
    """Connection settings for the Kafka cluster that carries photo uploads and event updates."""

    bootstrap_servers: str = Field(description="host:port list of the brokers.")
    consumer_group: str = Field(
        default="snapmap-pipeline",
        description="Consumer group whose committed offsets show the pipeline's real backlog.",
    )
    security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: str | None = Field(default=None, description="PLAIN, SCRAM-SHA-256/512.")
    sasl_username: str | None = Field(default=None, description="SASL user (from EnvVar).")
    sasl_password: str | None = Field(default=None, description="SASL password (EnvVar).")
    ssl_ca_location: str | None = Field(default=None, description="Path of a CA bundle (PEM).")
    timeout_s: float = Field(default=10.0, description="Timeout of each broker call.")
    coordinator_retry_s: float = Field(
        default=30.0,
        description=(
            "How long offset commits and committed-offset reads keep retrying while the group "
            "coordinator moves or loads (5-15 s after a broker restart), with backoff."
        ),
    )

    # One admin client per resource instance (a run, a sensor tick, a CLI command), and the
    # topic ids it last saw.
    _admin_client: AdminClient | None = PrivateAttr(default=None)
    _admin_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    # The producer behind ``send``, kept between calls (see ``send``).
    _sender: Producer | None = PrivateAttr(default=None)
    _sender_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _topic_ids: dict[str, str] = PrivateAttr(default_factory=dict)

    def _base_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "socket.timeout.ms": int(self.timeout_s * 1000),
            "socket.connection.setup.timeout.ms": int(self.timeout_s * 1000),
            # librdkafka's own lines go to a named Python logger (not straight to stderr), so
            # the run log and the log configuration decide what is shown; the reconnect
            # chatter of an outage is condensed to a few lines (shared by every client).
            "logger": _LIBRDKAFKA_LOG,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
        }
        config.update({k: v for k, v in optional.items() if v})
        return config

    def consumer_config(self) -> dict[str, Any]:
        """The configuration of ``consumer``'s consumers."""
        return {
            **self._base_config(),
            "group.id": self.consumer_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # An offset deleted by retention must be noticed, never skipped silently.
            "auto.offset.reset": "error",
            "enable.partition.eof": True,
        }

    @contextmanager
    def consumer(self) -> Iterator[Consumer]:
        """A consumer for explicit reads: it never stores or commits offsets by itself."""
        consumer = Consumer(self.consumer_config())
        try:
            yield consumer
        finally:
            consumer.close()

    def _new_producer(self) -> Producer:
        return Producer(
            {
                **self._base_config(),
                "enable.idempotence": True,
                "acks": "all",
                "message.timeout.ms": int(self.timeout_s * 3000),
                "linger.ms": 5,
            }
        )

    @contextmanager
    def producer(self) -> Iterator[Producer]:
        """An idempotent producer of its own; pending messages are flushed (bounded) on exit."""
        producer = self._new_producer()
        try:
            yield producer
        finally:
            remaining = producer.flush(self.timeout_s * 3)
            if remaining:
                raise KafkaUnavailable(f"{remaining} messages not delivered before the timeout")

    def start_sender(self) -> None:
        """Start ``send``'s producer now, if none is running, so that it holds its producer id
        by the time of the first ``send``.

        A new idempotent producer whose first message is produced at once waits about 0.5 s
        for its first acknowledgement; started 0.2 s or more before it, it does not
        (``bench/pipeline/producer_start.py``). A run calls this when it starts, before
        reading its batch."""
        with self._sender_lock:
            if self._sender is None:
                self._sender = self._new_producer()

    def send(self, topic: str, messages: Sequence[tuple[bytes | None, bytes | None, list]]) -> None:
        """Produce ``(key, value, headers)`` messages and wait until the broker acknowledged
        every one; raises ``KafkaUnavailable`` naming the first failure otherwise.

        One producer serves every call (one at a time) until a call fails: a new idempotent
        producer asks the broker for a producer id and the topics' metadata before its first
        message is acknowledged (keeping it took the event-updates step of a streaming run of
        1,650 photos from 4.6-5.0 s to 3.1-3.8 s, BENCHMARKS.md). After a failure the next
        call starts a new producer, since an idempotent producer may be left in a fatal state.
        """
        failures: list[str] = []

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failures.append(str(error))

        with self._sender_lock:
            if self._sender is None:
                self._sender = self._new_producer()
            producer = self._sender
            try:
                for key, value, headers in messages:
                    while True:
                        try:
                            producer.produce(
                                topic,
                                value=value,
                                key=key,
                                headers=headers,
                                on_delivery=on_delivery,
                            )
                            break
                        except BufferError:
                            producer.poll(0.5)
                    producer.poll(0)
                remaining = producer.flush(self.timeout_s * 3)
            except BaseException:
                self._sender = None
                raise
            if remaining or failures:
                self._sender = None
        if remaining:
            raise KafkaUnavailable(f"{remaining} messages not delivered before the timeout")
        if failures:
            raise KafkaUnavailable(
                f"{len(failures)} of {len(messages)} messages to {topic} failed: {failures[0]}"
            )

    def admin(self) -> AdminClient:
        """This instance's admin client, created on first use and kept for its lifetime."""
        with self._admin_lock:
            if self._admin_client is None:
                self._admin_client = AdminClient(self._base_config())
            return self._admin_client

    def partitions(self, consumer: Consumer, topic: str) -> list[int]:
        """Partition ids of ``topic``; raises ``KafkaUnavailable`` when the broker is silent,
        ``TopicMissing`` when it says the topic does not exist."""
        try:
            metadata = consumer.list_topics(topic, timeout=self.timeout_s)
        except KafkaException as error:
            raise KafkaUnavailable(f"metadata for {topic}: {error}") from error
        topic_metadata = metadata.topics.get(topic)
        error = topic_metadata.error if topic_metadata is not None else None
        if topic_metadata is None or (
            error is not None and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        ):
            raise TopicMissing(f"topic {topic} does not exist on {self.bootstrap_servers}")
        if error is not None:
            raise KafkaUnavailable(f"topic {topic} is not available: {error}")
        return sorted(topic_metadata.partitions)

    def topic_id(self, topic: str) -> str:
        """The broker's id of ``topic``, as ``kafka-topics.sh --describe`` prints it (URL-safe
        base64 of its UUID), asked now (one describe round trip). A topic deleted and created
        again under the same name gets a new id; the id is how the sensor and the offset
        commit tell the two apart. Raises ``TopicMissing`` when the topic does not exist."""
        admin = self.admin()
        try:
            future = admin.describe_topics(
                TopicCollection([topic]), request_timeout=self.timeout_s
            )[topic]
            description = future.result(timeout=self.timeout_s * 2)
        except KafkaException as error:
            code = error.args[0].code() if error.args else None
            if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise TopicMissing(
                    f"topic {topic} does not exist on {self.bootstrap_servers}"
                ) from error
            raise KafkaUnavailable(f"description of {topic}: {error}") from error
        except TimeoutError as error:
            raise KafkaUnavailable(f"description of {topic}: no answer") from error
        # librdkafka prints the standard alphabet; Kafka's tools print the URL-safe one.
        current = str(description.topic_id).replace("+", "-").replace("/", "_")
        self._topic_ids[topic] = current
        return current

    def known_topic_id(self, topic: str) -> str:
        """The id this instance last saw for ``topic`` (asked once if never): for a step
        whose result a fresh ``topic_id`` check guards later, as the offset commit does."""
        known = self._topic_ids.get(topic)
        return known if known is not None else self.topic_id(topic)

    def watermarks(self, consumer: Consumer, topic: str, partition: int) -> Watermarks:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=self.timeout_s, cached=False
            )
        except KafkaException as error:
            raise KafkaUnavailable(f"watermarks of {topic}/{partition}: {error}") from error
        return Watermarks(low, high)

    def committed(
        self,
        consumer: Consumer,
        topic: str,
        partitions: Sequence[int],
        coordinator_retry_s: float | None = None,
    ) -> dict[int, int]:
        """The consumer group's committed next offset per partition (absent when none).
        ``coordinator_retry_s`` overrides the resource's wait for a loading coordinator (a
        sensor tick passes what is left of its budget)."""
        found = self._retrying(
            f"committed offsets of {topic}",
            lambda: consumer.committed(
                [TopicPartition(topic, p) for p in partitions], timeout=self.timeout_s
            ),
            coordinator_retry_s,
        )
        return {tp.partition: tp.offset for tp in found if tp.offset != _OFFSET_INVALID}

    def _retrying(
        self, what: str, call: Callable[[], T], coordinator_retry_s: float | None = None
    ) -> T:
        """Run ``call``, retrying errors the broker marks retriable (a leader moving) with
        backoff for up to ``timeout_s``, and group-coordinator errors (NOT_COORDINATOR, a
        coordinator still loading) for up to ``coordinator_retry_s``; anything else, or a
        retriable error that outlasts its budget, raises ``KafkaUnavailable``."""
        started = time.monotonic()
        coordinator_budget = (
            self.coordinator_retry_s if coordinator_retry_s is None else coordinator_retry_s
        )
        delay = 0.1
        attempts = 0
        while True:
            attempts += 1
            try:
                return call()
            except KafkaException as error:
                kafka_error = error.args[0] if error.args else None
                code = kafka_error.code() if isinstance(kafka_error, KafkaError) else None
                if code in COORDINATOR_ERRORS:
                    budget = coordinator_budget
                elif isinstance(kafka_error, KafkaError) and kafka_error.retriable():
                    budget = self.timeout_s
                else:
                    budget = 0.0
                elapsed = time.monotonic() - started
                if elapsed + delay > budget:
                    raise KafkaUnavailable(
                        f"{what}: {error} (after {attempts} attempts in {elapsed:.1f} s)"
                    ) from error
                if attempts == 1:
                    _log.info("%s: %s; retrying for up to %g s", what, error, budget)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def commit_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """Commit ``next_offset`` for the consumer group, synchronously.

        The pipeline commits as a client outside the group (it never subscribes). The broker
        refuses such commits while any consumer is a member of the group, so another consumer
        subscribed with the pipeline's group id stops every commit until it leaves; that is
        raised with its cause named (nothing is lost: the run fails and is retried)."""
        with self.consumer() as consumer:
            try:
                self._retrying(
                    f"commit {topic}/{partition}@{next_offset}",
                    lambda: consumer.commit(
                        offsets=[TopicPartition(topic, partition, next_offset)],
                        asynchronous=False,
                    ),
                )
            except KafkaUnavailable as failed:
                cause = failed.__cause__
                code = cause.args[0].code() if isinstance(cause, KafkaException) else None
                if code in (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION):
                    raise KafkaUnavailable(
                        f"commit {topic}/{partition}@{next_offset} refused: consumer group "
                        f"{self.consumer_group!r} has active members (another consumer "
                        "subscribed with the pipeline's group id); offsets are committed again "
                        "once it leaves, and no other consumer may use this group id"
                    ) from cause
                raise

    def read_range(self, offsets: OffsetRange) -> tuple[list[Message], int]:
        """Read exactly ``offsets`` with assign + seek, so a re-executed run reads the same
        messages. Returns the messages and how many leading offsets retention had already
        deleted (they can never be read; the caller records the gap): never more than the
        range holds, however far past its end retention has gone."""
        messages: list[Message] = []
        deadline = time.monotonic() + self.timeout_s * 3
        with self.consumer() as consumer:
            marks = self.watermarks(consumer, offsets.topic, offsets.partition)
            start = max(offsets.first, marks.low)
            lost = max(0, min(start, offsets.last + 1) - offsets.first)
            if start > offsets.last:
                return messages, lost
            if marks.high <= offsets.last:
                raise KafkaUnavailable(
                    f"{offsets.key} ends beyond the partition's end offset {marks.high}"
                )
            consumer.assign([TopicPartition(offsets.topic, offsets.partition, start)])
            position = start
            while position <= offsets.last:
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"read of {offsets.key} stalled at offset {position}")
                # Ask for no more than the range still holds: a batch waits for its count or
                # the timeout, so a range that ends at the partition's end (every streaming
                # run's) would otherwise wait the whole second for messages not yet written.
                wanted = min(1000, offsets.last - position + 1)
                for message in consumer.consume(num_messages=wanted, timeout=1.0):
                    error = message.error()
                    if error is not None and error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaUnavailable(f"read of {offsets.key}: {error}")
                    if error is None and message.offset() <= offsets.last:
                        messages.append(message)
                # The position also moves past transaction markers, which carry no message.
                position = consumer.position([TopicPartition(offsets.topic, offsets.partition)])[
                    0
                ].offset
        return messages, lost

    def ensure_topics(self, topics: dict[str, int]) -> None:
        """Create missing topics (name -> partitions); existing ones are left alone."""
        admin = self.admin()
        futures = admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=n,
                    replication_factor=1,
                    config={"message.timestamp.after.max.ms": "3600000"},
                )
                for name, n in topics.items()
            ],
            request_timeout=self.timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=self.timeout_s)
            except KafkaException as error:
                if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaUnavailable(f"create topic {name}: {error}") from error


def encode_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
