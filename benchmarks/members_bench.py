"""Member token tables at scale: is the next window's table ready before it starts, and is resolution O(1)?

With `--members` N (default 100,000) random members:

- full table ms: building one window's token table at once (what a tick would stall on without `prepare`);
- prepare chunk ms: the largest cost of one `MemberDirectory.prepare` call (a tick's share, `--chunk` members);
- ready after s: data time, at one prepare per `--tick` seconds, until the window after next is built
  (it must be far below the 900-s window, so the table is there before the window starts);
- resolve µs: median over `--lookups` member frames (half known, half unknown) with N members and with 100,
  to show resolution does not grow with the member count;
- vault save / load ms: the encrypted key file (gateway/members.py) with N members.

Run from the repository root: ``.venv/bin/python benchmarks/members_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from gateway.identity import TOKEN_WINDOW_S, MemberDirectory, member_token
from gateway.members import KeyVault, MemberKey, MemberSet
from gateway.model import MemberFrame


def resolve_us(d: MemberDirectory, keys: list[bytes], ts: float, lookups: int) -> float:
    window = int(ts // TOKEN_WINDOW_S)
    frames = [MemberFrame(1, window & 0xFF, -59, member_token(k, window)) for k in keys[: lookups // 2]]
    frames += [MemberFrame(1, window & 0xFF, -59, os.urandom(8)) for _ in range(lookups - len(frames))]
    times = []
    for f in frames:
        t0 = time.perf_counter()
        d.resolve(f, ts)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=1_000)
    ap.add_argument("--tick", type=float, default=0.1, help="data time between prepare calls, s")
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rng = random.Random(1)
    keys = {f"m-{i}": rng.randbytes(32) for i in range(args.members)}
    ts = 1_780_000_000.0
    d = MemberDirectory(chunk=args.chunk)
    d.set_members(keys)
    t0 = time.perf_counter()
    d.prepare(ts)  # at start: current window and both neighbours, at once
    start_ms = (time.perf_counter() - t0) * 1000
    full_ms = start_ms / 3
    window = int(ts // TOKEN_WINDOW_S)
    chunk_ms, now = [], ts
    while not d.ready(window + 2):
        now += args.tick
        t0 = time.perf_counter()
        d.prepare(now)
        chunk_ms.append((time.perf_counter() - t0) * 1000)
    ready_after = now - ts
    big = resolve_us(d, list(keys.values()), ts, args.lookups)
    small_d = MemberDirectory()
    small_keys = dict(list(keys.items())[:100])
    small_d.set_members(small_keys)
    small_d.prepare(ts)
    small = resolve_us(small_d, list(small_keys.values()), ts, args.lookups)

    with tempfile.TemporaryDirectory() as tmp:
        vault = KeyVault(Path(tmp))
        mset = MemberSet(1, tuple(MemberKey(r, k, None) for r, k in keys.items()))
        t0 = time.perf_counter()
        vault.save(mset)
        save_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        vault.load()
        load_ms = (time.perf_counter() - t0) * 1000
        size = vault.path.stat().st_size

    out = {
        "members": args.members,
        "start_three_tables_ms": round(start_ms, 1),
        "full_table_ms": round(full_ms, 1),
        "prepare_chunk_max_ms": round(max(chunk_ms), 2),
        "prepare_calls": len(chunk_ms),
        "next_table_ready_after_s": round(ready_after, 2),
        "window_s": TOKEN_WINDOW_S,
        "resolve_us_median": round(big, 2),
        "resolve_us_median_100_members": round(small, 2),
        "vault_save_ms": round(save_ms, 1),
        "vault_load_ms": round(load_ms, 1),
        "vault_bytes": size,
    }
    if args.json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        print(f"{k:32} {v}")


if __name__ == "__main__":
    main()
