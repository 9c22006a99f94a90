"""What metrics add to each request, in-process and without the noise of a shared machine: the relay's per-chunk
meter, reading an answer's token counts, the bus taps that count one decision record, and one /metrics scrape.

Run on demand: `python -m bench.metrics_cost`. Prints microseconds per operation (best of several repeats).
"""

from __future__ import annotations

import argparse
import json
import time
import timeit
from collections.abc import Callable

from hal0.dispatch.decisions import Decision
from hal0.dispatch.usage import AnswerMeter
from hal0.events import EventBus
from hal0.metrics import Metrics
from hal0.slots.state import SlotState
from hal0.stats import SlotSample, StatsRing

CHAT = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 400},
                                "finish_reason": "stop"}], "created": 1, "model": "tiny", "object": "chat.completion",
                   "usage": {"completion_tokens": 64, "prompt_tokens": 12, "total_tokens": 76}, "id": "c",
                   "timings": {"cache_n": 0, "prompt_n": 12, "predicted_n": 64}}).encode()
TOKEN = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"ab"}}],"created":1,"id":"c"}\n\n'
LAST = (b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1,"id":"c",'
        b'"timings":{"cache_n":0,"prompt_n":12,"predicted_n":128}}\n\ndata: [DONE]\n\n')


def best_us(fn: Callable[[], object], number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__)
    p.add_argument("--number", type=int, default=20000, help="operations per repeat")
    args = p.parse_args(argv)
    n = args.number

    meter = AnswerMeter("text/event-stream")
    print(f"{'meter.feed, per chunk':<44} {best_us(lambda: meter.feed(TOKEN), n):7.2f} us")

    def stream_usage() -> object:
        m = AnswerMeter("text/event-stream")
        for _ in range(128):
            m.feed(TOKEN)
        m.feed(LAST)
        return m.usage()

    feed_128 = best_us(lambda: [meter.feed(TOKEN) for _ in range(129)], max(1, n // 100))
    print(f"{'usage of a 128-token stream (after the end)':<44} "
          f"{best_us(stream_usage, max(1, n // 100)) - feed_128:7.2f} us")

    def json_usage() -> object:
        m = AnswerMeter("application/json")
        m.feed(CHAT)
        return m.usage()

    print(f"{'usage of a chat answer (JSON, 1 chunk)':<44} {best_us(json_usage, n):7.2f} us")

    bus = EventBus(ring_size=16)
    stats = StatsRing()
    slots = [SlotSample(name, "ready", 0, 1 << 30, 1 << 30) for name in ("primary", "embed", "stt", "tts")]
    metrics = Metrics([s.value for s in SlotState], lambda: slots)
    record = Decision(request_id="r", endpoint="/v1/chat/completions", model="primary", slot="primary",
                      reason="exact slot name", status=200, duration_ms=12.5, outcome="ok", ttft_ms=3.2,
                      prompt_tokens=12, completion_tokens=64)

    def publish_plain() -> None:
        record.time = time.time()
        bus.publish("decision", record.to_dict())

    plain = best_us(publish_plain, n)
    bus.tap(metrics.observe)
    bus.tap(stats.observe)
    tapped = best_us(publish_plain, n)
    print(f"{'taps on one decision record (metrics + ring)':<44} {tapped - plain:7.2f} us  "
          f"(publish alone {plain:.2f} us)")
    stats.sample(time.time(), slots)
    print(f"{'one /metrics exposition (4 slots)':<44} {best_us(metrics.exposition, max(1, n // 100)):7.2f} us")
    print(f"{'one /api/stats view (4 slots x 900 s)':<44} "
          f"{best_us(lambda: json.dumps(stats.view(int(time.time()))), max(1, n // 1000)):7.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
