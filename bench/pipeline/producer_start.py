"""A run's first send (issue 7, per-run start-up): how long a new ``KafkaResource`` takes to
have its first messages acknowledged when its producer is started at the send, and when it is
started (``start_sender``) a given time before it, as a run does before reading its batch.

Each round makes a new resource (so a new idempotent producer), optionally starts its producer
and sleeps, then sends ``--messages`` messages to a topic of its own and times that ``send``.
The two ways alternate so that both see the same load.

Run: ``python -m bench.pipeline.producer_start --rounds 5 --head-start 0.2``.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.pipeline.common import emit, isolated_stack, machine, median
from snapmap_pipeline.resources.kafka import KafkaResource


def first_send_s(template: KafkaResource, topic: str, messages: int, head_start: float) -> float:
    """Seconds the first ``send`` of a new resource takes; with a head start, its producer
    was started that many seconds before."""
    kafka = KafkaResource(**template.model_dump())
    if head_start:
        kafka.start_sender()
        time.sleep(head_start)
    batch = [(str(i).encode(), b'{"eventId": "bench"}', []) for i in range(messages)]
    began = time.perf_counter()
    kafka.send(topic, batch)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--head-start", type=float, default=0.2)
    args = parser.parse_args()

    before = machine()
    seconds: dict[str, list[float]] = {"started_at_send": [], "started_before": []}
    with isolated_stack() as stack:
        topic = stack.settings.event_updates_topic
        for round_index in range(args.rounds):
            for name, head_start in (("started_at_send", 0.0), ("started_before", args.head_start)):
                took = first_send_s(stack.kafka, topic, args.messages, head_start)
                seconds[name].append(took)
                print(json.dumps({"round": round_index + 1, name: took}), flush=True)
    emit(
        "producer-start",
        {
            "command": "python -m bench.pipeline.producer_start "
            f"--rounds {args.rounds} --messages {args.messages} --head-start {args.head_start}",
            "machine_before": before,
            "machine_after": machine(),
            "seconds": seconds,
            "median_s": {name: median(values) for name, values in seconds.items()},
        },
    )


if __name__ == "__main__":
    main()
