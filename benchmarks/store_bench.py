"""Measure what one tick costs the store as the history (ledger and visits) grows.

The hot file holds the outbox and a short journal only; awards and visits go to per-day
history files (appended every ROLL_EVERY records), so the cost per tick should stay flat
whatever N is. For each size N the store is seeded with N awards and N finished visits,
`--per-day` a day (so N / per-day day files), then runs ticks of the runtime's shape: put
`--events-per-tick` events, ack the previous tick's events, add a few awards and visits, commit.
Printed per size:

- put ms: the in-memory writes of one tick (TinyDB rebuilds a table per operation);
- commit ms: the atomic write of one tick (serialise, write, fsync, rename, fsync dir),
  median; "mean" includes the amortised appends of the journal to the day files;
- µs/event: mean commit cost divided by the events, awards and visits of one tick;
- events-only commit ms: the same for a tick that only puts and acks events (most ticks);
- serialise ms: json.dumps of the same state alone, to split CPU from disk;
- open ms: opening the store again (the hot file, and the day files of the last INDEX_DAYS days or as far
  back as `--visits-limit` visits need: it stays flat once the history is longer than that);
- file size.

Each figure is the median of `--ticks` runs. Run from the repository root:
``.venv/bin/python benchmarks/store_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.model import Award, Event, Visit, ZoneSegment
from gateway.store import Store

T0 = 1_764_000_000.0


def make_event(seq: int) -> Event:
    return Event(
        type="zone.changed",
        id=f"0193a000-0000-7000-8000-{seq:012d}",
        ts=T0 + seq,
        store="store-0042",
        gateway="gw-0042-a",
        seq=seq,
        data={"visit_id": f"visit-{seq:08d}", "from": "entrance", "to": "dairy", "member": "m-00017"},
    )


def started(n: int, per_day: int) -> float:
    """When record n's visit began: `per_day` visits a day, spread over 12 hours of each day."""
    return T0 + (n // per_day) * 86_400.0 + (n % per_day) * (43_200.0 / per_day)


def make_award(n: int, per_day: int) -> Award:
    ts = started(n, per_day) + 600.0
    return Award(
        award_id=f"award-{n:010d}",
        member=f"m-{n % 5000:05d}",
        rule="visit-basic",
        points=10,
        visit_id=f"visit-{n:08d}",
        ts=ts,
        day=datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d"),
        reason="visit of at least 5 minutes",
    )


def make_visit(n: int, per_day: int) -> Visit:
    start = started(n, per_day)
    return Visit(
        visit_id=f"visit-{n:08d}",
        subject=f"member:m-{n % 5000:05d}",
        started=start,
        ended=start + 600.0,
        segments=(
            ZoneSegment("entrance", start, start + 30.0),
            ZoneSegment("dairy", start + 30.0, start + 300.0),
            ZoneSegment("checkout", start + 300.0, start + 600.0),
        ),
        classification="visitor",
        source="ble",
    )


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def bench_size(root: Path, size: int, ticks: int, events_per_tick: int, limit: int, per_day: int) -> dict[str, float]:
    data_dir = root / f"n{size}"
    store = Store(data_dir, recent_visits_limit=limit)
    t = time.perf_counter()
    store.put_awards(make_award(n, per_day) for n in range(size))
    store.put_visits(make_visit(n, per_day) for n in range(size))
    seed_put = ms_since(t)
    t = time.perf_counter()
    store.commit()
    store.commit()  # the second commit writes the journal cleared by the roll
    seed_commit = ms_since(t)

    puts: list[float] = []
    commits: list[float] = []
    seq = 0
    extra = size
    previous: list[str] = []
    for _ in range(ticks):
        events = [make_event(seq + i + 1) for i in range(events_per_tick)]
        seq += events_per_tick
        t = time.perf_counter()
        store.put_events(events)
        store.ack_events(previous)
        store.put_awards([make_award(extra, per_day), make_award(extra + 1, per_day)])
        store.put_visits([make_visit(extra, per_day), make_visit(extra + 1, per_day)])
        puts.append(ms_since(t))
        t = time.perf_counter()
        store.commit()
        commits.append(ms_since(t))
        previous = [e.id for e in events]
        extra += 2
    events_only: list[float] = []
    for _ in range(ticks):
        events = [make_event(seq + i + 1) for i in range(events_per_tick)]
        seq += events_per_tick
        store.put_events(events)
        store.ack_events(previous)
        t = time.perf_counter()
        store.commit()
        events_only.append(ms_since(t))
        previous = [e.id for e in events]
    visits = store.diagnostics()["recent_visits"]
    days = len(store.history_days())
    size_bytes = store.diagnostics()["file_size_bytes"]
    store.close()

    state = json.loads(store.path.read_bytes())
    serialise: list[float] = []
    opens: list[float] = []
    for _ in range(3):
        t = time.perf_counter()
        json.dumps(state, separators=(",", ":"))
        serialise.append(ms_since(t))
        t = time.perf_counter()
        Store(data_dir, recent_visits_limit=limit).close()
        opens.append(ms_since(t))
    return {
        "awards": size,
        "days": days,
        "visits": visits,
        "file_mb": size_bytes / 1e6,
        "seed_put_ms": seed_put,
        "seed_commit_ms": seed_commit,
        "put_ms": statistics.median(puts),
        "commit_ms": statistics.median(commits),
        "commit_mean_ms": statistics.fmean(commits),
        "us_per_record": statistics.fmean(commits) * 1000.0 / (events_per_tick + 4),
        "events_only_commit_ms": statistics.median(events_only),
        "serialise_ms": statistics.median(serialise),
        "open_ms": statistics.median(opens),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        default="1000,10000,100000",
        help="comma-separated record counts for the ledger and for the visits table (default: %(default)s)",
    )
    p.add_argument(
        "--visits-limit",
        type=int,
        default=5000,
        help="recent_visits_limit of the store: the visits held in memory (default: the gateway's, %(default)s)",
    )
    p.add_argument(
        "--per-day",
        type=int,
        default=1000,
        help="awards and visits a day in the history, which is spread over as many day files (default: %(default)s)",
    )
    p.add_argument("--ticks", type=int, default=300, help="ticks measured per size; medians are printed")
    p.add_argument("--events-per-tick", type=int, default=20, help="events put (and acked) per tick")
    p.add_argument("--dir", type=Path, help="where to create the stores (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object per size instead of a table")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: must be comma-separated integers")
    if min(args.ticks, args.events_per_tick, args.visits_limit, args.per_day, *sizes) < 1:
        p.error("--ticks, --events-per-tick, --visits-limit, --per-day and every size must be at least 1")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        if not args.json:
            print(
                f"{'awards':>7} {'days':>5} {'visits':>7} {'file MB':>8} {'put ms':>8} {'commit ms':>10} {'mean':>6} "
                f"{'µs/rec':>7} {'ev-only commit ms':>18} {'serialise ms':>13} {'open ms':>8}"
            )
        for size in sizes:
            r = bench_size(root, size, args.ticks, args.events_per_tick, args.visits_limit, args.per_day)
            if args.json:
                print(json.dumps(r))
            else:
                print(
                    f"{size:>7} {r['days']:>5.0f} {r['visits']:>7.0f} {r['file_mb']:>8.2f} {r['put_ms']:>8.2f} "
                    f"{r['commit_ms']:>10.2f} {r['commit_mean_ms']:>6.2f} {r['us_per_record']:>7.1f} "
                    f"{r['events_only_commit_ms']:>18.2f} "
                    f"{r['serialise_ms']:>13.2f} {r['open_ms']:>8.1f}"
                )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
