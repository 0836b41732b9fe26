"""Real Kafka clients, run inside the test's network namespace by the tests:

    python kafka_clients.py mock SECONDS              # librdkafka's mock cluster; prints its bootstrap
    python kafka_clients.py confluent-produce BOOTSTRAP TOPIC[,TOPIC...] [N [plain]]
    python kafka_clients.py confluent-consume BOOTSTRAP TOPIC N
    python kafka_clients.py aiokafka-produce BOOTSTRAP TOPIC[,TOPIC...] [N]
    python kafka_clients.py aiokafka-consume BOOTSTRAP TOPIC N
    python kafka_clients.py confluent-bench BOOTSTRAP TOPIC N M   # bench/bench_l7_kafka.py
    python kafka_clients.py confluent-big BOOTSTRAP TOPIC BYTES

Producers send N messages to each topic in turn with ONE client (so one connection to the
broker) and print one JSON line per topic: {"topic", "ok", "errors": [error names]}.
Consumers print {"topic", "values": [...], "error": name or null}."""

from __future__ import annotations

import asyncio
import json
import sys
import time


def mock(seconds: float) -> None:
    import confluent_kafka

    producer = confluent_kafka.Producer({"test.mock.num.brokers": 1,
                                         "bootstrap.servers": "", "log_level": 0})
    brokers = producer.list_topics(timeout=10).brokers
    broker = next(iter(brokers.values()))
    print(f"{broker.host}:{broker.port}", flush=True)
    time.sleep(seconds)


def confluent_produce(bootstrap: str, topics: list[str], n: int,
                      idempotent: bool = True) -> None:
    import confluent_kafka

    producer = confluent_kafka.Producer({
        "bootstrap.servers": bootstrap, "message.timeout.ms": 8000,
        "enable.idempotence": idempotent, "log_level": 0, "linger.ms": 0})
    for topic in topics:
        results: list[str | None] = []

        def report(err, _msg, results=results):
            results.append(err.name() if err is not None else None)

        for i in range(n):
            try:
                producer.produce(topic, value=f"{topic}-{i}".encode(), on_delivery=report)
            except confluent_kafka.KafkaException as exc:  # denial already known locally
                results.append(exc.args[0].name())
        producer.flush(15)
        errors = [r for r in results if r is not None]
        print(json.dumps({"topic": topic, "ok": len(results) - len(errors),
                          "errors": sorted(set(errors))}), flush=True)


def confluent_consume(bootstrap: str, topic: str, n: int) -> None:
    import confluent_kafka

    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"g-{topic}", "log_level": 0,
        "auto.offset.reset": "earliest", "enable.auto.commit": True})
    consumer.subscribe([topic])
    values, error = [], None
    deadline = time.monotonic() + 20
    while len(values) < n and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            error = msg.error().name()
            if msg.error().fatal() or "AUTHORIZATION" in error:
                break
            continue
        values.append(msg.value().decode())
    consumer.close()
    print(json.dumps({"topic": topic, "values": values, "error": error}), flush=True)


async def aiokafka_produce(bootstrap: str, topics: list[str], n: int) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=8000,
                                enable_idempotence=True)
    await producer.start()
    try:
        for topic in topics:
            ok, errors = 0, set()
            for i in range(n):
                try:
                    await asyncio.wait_for(producer.send_and_wait(
                        topic, f"{topic}-{i}".encode()), 12)
                    ok += 1
                except Exception as exc:  # the error's name is what the test checks
                    errors.add(type(exc).__name__)
            print(json.dumps({"topic": topic, "ok": ok, "errors": sorted(errors)}), flush=True)
    finally:
        await producer.stop()


async def aiokafka_consume(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"ag-{topic}",
                                auto_offset_reset="earliest", request_timeout_ms=8000)
    values, error = [], None
    try:
        await consumer.start()
        deadline = time.monotonic() + 20
        while len(values) < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                values += [r.value.decode() for r in records]
    except Exception as exc:  # the error's name and text are what the test checks
        error = f"{type(exc).__name__}: {exc}"
    finally:
        await consumer.stop()
    print(json.dumps({"topic": topic, "values": values, "error": error}), flush=True)


def confluent_bench(bootstrap: str, topic: str, n: int, m: int) -> None:
    """{"msgs_per_s": n messages produced as fast as the client goes (acks=all),
    "p99_ms"/"p50_ms": latency of m messages produced one at a time}."""
    import confluent_kafka

    producer = confluent_kafka.Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "log_level": 0,
        "queue.buffering.max.messages": 1000000})
    producer.produce(topic, b"warm-up")
    producer.flush(10)
    failed = []

    def report(err, _msg):
        if err is not None:
            failed.append(err.name())

    payload = b"x" * 100
    start = time.perf_counter()
    for _ in range(n):
        producer.produce(topic, payload, on_delivery=report)
        producer.poll(0)
    producer.flush(60)
    rate = n / (time.perf_counter() - start)
    latencies = []
    for _ in range(m):
        t0 = time.perf_counter()
        producer.produce(topic, payload, on_delivery=report)
        producer.flush(10)
        latencies.append((time.perf_counter() - t0) * 1000)
    latencies.sort()
    print(json.dumps({"msgs_per_s": rate, "p50_ms": latencies[len(latencies) // 2],
                      "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
                      "errors": sorted(set(failed))}), flush=True)


def confluent_big(bootstrap: str, topic: str, size: int) -> None:
    """One message of `size` bytes: a Produce frame far larger than the proxy's read-ahead
    (1 MiB), which it must buffer whole to decide on it."""
    import confluent_kafka

    producer = confluent_kafka.Producer({
        "bootstrap.servers": bootstrap, "message.max.bytes": size + 100000,
        # generous: a 3 MB frame crosses the proxy, which buffers it whole, on a busy machine
        "compression.type": "none", "log_level": 0, "message.timeout.ms": 60000})
    results = []
    try:
        producer.produce(topic, b"b" * size, on_delivery=lambda err, _m: results.append(
            err.name() if err is not None else None))
    except confluent_kafka.KafkaException as exc:
        # librdkafka may already know the topic is denied (the proxy's Metadata answer
        # said 29) and refuse at produce() rather than in the delivery report
        results.append(exc.args[0].name())
    producer.flush(90)
    print(json.dumps({"topic": topic, "results": results}), flush=True)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "mock":
        mock(float(args[0]))
    elif command == "confluent-produce":
        confluent_produce(args[0], args[1].split(","), int(args[2]) if len(args) > 2 else 3,
                          idempotent=args[3:4] != ["plain"])
    elif command == "confluent-consume":
        confluent_consume(args[0], args[1], int(args[2]))
    elif command == "aiokafka-produce":
        asyncio.run(aiokafka_produce(args[0], args[1].split(","),
                                     int(args[2]) if len(args) > 2 else 3))
    elif command == "confluent-big":
        confluent_big(args[0], args[1], int(args[2]))
    elif command == "confluent-bench":
        confluent_bench(args[0], args[1], int(args[2]), int(args[3]))
    elif command == "aiokafka-consume":
        asyncio.run(aiokafka_consume(args[0], args[1], int(args[2])))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
