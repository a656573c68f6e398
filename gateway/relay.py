"""A relay: a second Pi at the far end of the shop as a remote receiver of the store's main gateway (docs/nodes.md).

`visita run --relay` runs source → decode → identify only and publishes what it identified as sighting batches
(`sensors.nodes.encode_batch`, schema ``visita.sightings/1``) on ``visita/v1/<store>/<relay>/sightings``; the main
gateway takes them (`sensors.nodes.NodesSource`) into its estimator beside its own radio. A relay has no estimator,
visits, points, events outbox or history: it never publishes visit events, so the backend never gets a store's
visits twice.

Sightings are live data: a batch goes straight to the broker (QoS 0), never through the durable outbox. While the
broker is away they are dropped, counted and said once, not queued: the main gateway's estimator would drop sightings
older than a second or so anyway (`gateway.estimate.REORDER_S`), and hours of them would only flood it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gateway.decode import Decoder
from gateway.identity import Identifier, MemberDirectory
from gateway.model import Sighting
from sensors.base import Source
from sensors.nodes import MAX_BATCH, encode_batch

if TYPE_CHECKING:
    from gateway.downlink import Downlink
    from gateway.members import MemberKeys
    from gateway.uplink import Uplink

log = logging.getLogger("visita.relay")

RELAY_INTERVAL_S = 0.25
"""Data seconds between batches: docs/nodes.md asks peers for one at least every 0.5 s (the main gateway's estimator
decides each second about a second after it ends); an empty batch goes too, so the main gateway knows the relay is
there and keeps its clock offset measured."""


class BatchPublisher:
    """Collects a relay's sightings and publishes them as one batch every `interval_s` of data time.

    `publish(payload)` sends one batch and says whether it went (the uplink's `publish_live`: False while the broker
    is away). A batch that did not go is dropped and counted; the first of an outage is logged, and so is the end of
    it. `seq` counts batches from 0 at each start; the main gateway tells a resend from a restart by `sent` too.
    """

    def __init__(
        self,
        gateway: str,
        publish: Callable[[bytes], bool],
        anon_key: str | None = None,
        interval_s: float = RELAY_INTERVAL_S,
        max_rows: int = MAX_BATCH,
    ) -> None:
        """`anon_key`: the public id of the store secret (`gateway.identity.secret_id`), named in every batch."""
        if not interval_s > 0 or max_rows < 1:
            raise ValueError("interval_s must be more than 0 and max_rows at least 1")
        self.gateway = gateway
        self._publish = publish
        self.anon_key = anon_key
        self.interval_s = interval_s
        self.max_rows = max_rows
        self._rows: list[Sighting] = []
        self._last: float | None = None
        self.seq = 0
        """The next batch's seq."""
        self._out = False
        self.last_error = ""
        self.counts = {
            "batches": 0,
            "sightings": 0,
            "dropped_batches": 0,
            "dropped_sightings": 0,
            "outages": 0,
        }

    def add(self, sightings: Sequence[Sighting]) -> None:
        """Sightings to go with the next batch."""
        self._rows.extend(sightings)

    def flush(self, now: float, force: bool = False) -> int:
        """Publish what was added as batches (of at most `max_rows`; one empty batch when nothing was) if
        `interval_s` has passed since the last flush, or `force`; returns the batches published."""
        if not force and self._last is not None and now - self._last < self.interval_s:
            return 0
        self._last = now
        rows, self._rows = self._rows, []
        chunks = [rows[i : i + self.max_rows] for i in range(0, len(rows), self.max_rows)] or [[]]
        sent = 0
        for chunk in chunks:
            payload = encode_batch(self.gateway, self.seq, now, chunk, self.anon_key)
            self.seq += 1
            if self._publish(payload):
                sent += 1
                self.counts["batches"] += 1
                self.counts["sightings"] += len(chunk)
                if self._out:
                    self._out = False
                    self.last_error = ""
                    log.info(
                        "relay: publishing sightings again (%d sighting(s) dropped while the broker was away)",
                        self.counts["dropped_sightings"],
                    )
                continue
            self.counts["dropped_batches"] += 1
            self.counts["dropped_sightings"] += len(chunk)
            if not self._out:
                self._out = True
                self.counts["outages"] += 1
                self.last_error = "the broker is away: sightings are dropped (live data, never queued)"
                log.warning(
                    "relay: the broker is away: sightings are dropped until it is back (live data: not queued), "
                    "and counted (/api/v1/status → relay)"
                )
        return sent

    def diagnostics(self) -> dict[str, Any]:
        """Batches and sightings published and dropped, outages, the next seq, whether it publishes now."""
        return {
            **self.counts,
            "seq": self.seq,
            "interval_s": self.interval_s,
            "publishing": not self._out,
            "last_error": self.last_error,
            "anon_key": self.anon_key,
        }


class Relay:
    """A relay's pipeline: source → decode → identify → `BatchPublisher`. The runtime (`gateway.runtime.run_relay`)
    builds it, owns time and calls `step` each tick; the dashboard's /api/v1/status reads `diagnostics`."""

    def __init__(
        self,
        store: str,
        gateway: str,
        version: str,
        source: Source,
        members: MemberDirectory,
        identifier: Identifier,
        publisher: BatchPublisher,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self.version = version
        self.source = source
        self.members = members
        self.decoder = Decoder()
        self.identifier = identifier
        self.publisher = publisher
        self.member_keys: MemberKeys | None = None
        """The member set and its vault, for the ``members`` downlink command (set by the runtime)."""
        self.uplink: Uplink | None = None
        self.downlink: Downlink[Relay] | None = None
        self.clock_state: Callable[[], dict[str, Any]] | None = None
        """The runtime clock's diagnostics (set by the runtime)."""
        self.now = 0.0
        self.ticks = 0
        self.adverts = 0

    def step(self, now: float) -> int:
        """One tick: what the source heard up to `now`, identified, then a batch if one is due; returns how many
        sightings it added."""
        self.now = now
        self.members.prepare(now)
        if self.downlink is not None:
            self.downlink.apply_pending()
        adverts = self.source.poll(now)
        self.adverts += len(adverts)
        sightings = self.identifier.identify(self.decoder.decode_batch(adverts))
        # Links (an anonymous subject found to be a member's app phone; yesterday's subject of a phone heard across
        # midnight) are for the stages after identify, which run on the main gateway: not relayed (docs/nodes.md).
        self.identifier.take_links()
        self.publisher.add(sightings)
        self.publisher.flush(now)
        self.ticks += 1
        return len(sightings)

    def shift(self, by: float) -> None:
        """The live clock was stepped forward by `by` seconds: identity's days follow (`Identifier.shift`)."""
        self.identifier.shift(by)
        if self.now:
            self.now += by

    def diagnostics(self) -> dict[str, Any]:
        """For /api/v1/status and `visita doctor`: the source, decoder, identity, members, what was published."""
        return {
            "role": "relay",
            "data_time": self.now,
            "ticks": self.ticks,
            "adverts": self.adverts,
            "source": self.source.diagnostics(),
            "decoder": self.decoder.diagnostics(),
            "identity": self.identifier.diagnostics(),
            "members": self.members.diagnostics(),
            "relay": self.publisher.diagnostics(),
            "uplink": self.uplink.diagnostics() if self.uplink is not None else {"broker": "off"},
            **({"clock": self.clock_state()} if self.clock_state is not None else {}),
        }
