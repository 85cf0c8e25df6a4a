"""The store contract: what every engine (SQLite, PostgreSQL) offers, split by consumer.

Each consumer is typed against the narrowest facet it needs (the spool against `Intake`, the
batcher against `Queue` + `Batches`, …), so mypy keeps the surface small. Engines implement
`Store`, which is all facets plus the lifecycle.

Rules every engine keeps (the contract suite in tests/store/ checks them on each engine):
- Every write is one transaction, run whole: it happened entirely or not at all when the call
  returns or raises, also when the calling task is cancelled meanwhile (the cancellation is
  delivered after the transaction ends). A store stays usable after any cancellation.
- Every write is idempotent or compare-and-set, so a caller that crashed or was cancelled may
  repeat it (documented per method).
- The store records; it decides nothing. Retry decisions, result lines, costs and backoffs are
  computed by the caller (batchd/policy.py, batchd/formats.py) and passed in.
- Several nodes may share one store (PostgreSQL). Each node owns the files it ingested (and so
  their results and its outbox); each live batch is owned by one node at a time under a lease
  that expires; an expired lease may be taken by any node.
- Results become visible to `results_after` in id order with no gaps behind the highest visible
  id (engines serialise result-inserting transactions if ids are not otherwise commit-ordered),
  so a delivery cursor "last id delivered" never skips a row.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..exits import EX_DATAERR, OperatorError
from ..formats import Status


class ItemState(enum.StrEnum):
    QUEUED = "queued"
    BATCHED = "batched"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    EXPIRED = "expired"
    CANCELED = "canceled"
    # Handed to the real-time fallback (its deadline came, see deadlines.py): no final result yet.
    # The first final answer wins, from the real-time API or a late batch result; a second one is
    # recorded as a duplicate cost, not as a result.
    REALTIME = "realtime"


class BatchState(enum.StrEnum):
    """Local batch states; the provider's own word is kept apart in `remote_status`."""

    PENDING = "pending"  # an intent with no remote batch known (create or reconcile next)
    UNVERIFIED = "unverified"  # adopted by reconciliation, not yet proven ours (Anthropic)
    SUBMITTED = "submitted"  # a remote batch that is ours
    DONE = "done"  # collected, or ended in a defined way (`fate`)


# The read models of Reporting.metrics(), each a named query `metrics_NAME` in both engines.
METRICS_READS = (
    "queue", "batches", "results", "retries", "capacity", "turnaround", "turnaround_pruned", "ingested",
)  # fmt: skip
# Upper bounds of batchd_batch_turnaround_seconds (submission to collection: minutes to the 24 h
# window). The store folds pruned batches into these buckets, so they are part of its contract.
TURNAROUND_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)

LIVE_BATCH_STATES = (BatchState.PENDING, BatchState.UNVERIFIED, BatchState.SUBMITTED)
POLLED_BATCH_STATES = (BatchState.UNVERIFIED, BatchState.SUBMITTED)


class FileState(enum.StrEnum):
    INGESTING = "ingesting"  # chunks are being committed; never completed by the outbox
    OPEN = "open"  # every line is in the store; results pending
    COMPLETE = "complete"  # every result delivered to out/ and the .part renamed


class Fate(enum.StrEnum):
    """How a batch ended when it did not end normally."""

    VANISHED = "vanished"
    OUTPUT_UNAVAILABLE = "output_unavailable"
    OVERDUE_CANCELLED = "overdue_cancelled"
    CANCELLED = "cancelled"  # by an operator (`batchd cancel`)
    DEADLINE_CANCELLED = "deadline_cancelled"  # for the real-time fallback (its requests' deadlines came)


class CancelReason(enum.StrEnum):
    """Why a batch is (to be) cancelled at the provider, and so what its unfinished requests become."""

    OPERATOR = "operator"  # `batchd cancel BATCH`: every request of the batch ends canceled
    FILE = "file"  # `batchd cancel --file`: the cancelled files' requests end canceled, others are requeued
    # A request's deadline (less its lead) came: unfinished requests with a deadline go to the
    # real-time fallback; those without one are requeued.
    DEADLINE = "deadline"
    EXPIRY = "expiry"  # still running past its window + grace: its unfinished requests are requeued


class Via(enum.StrEnum):
    """How a result was served (the result line's `via`)."""

    BATCH = "batch"
    REALTIME = "realtime"


class DuplicateCustomId(Exception):
    """add_chunk: an item's custom_id is already queued for this file by a committed chunk; the
    chunk changed nothing (dedupe it with seen_custom_ids and add it again)."""


class NotCreated(OperatorError):
    """The store is there but holds no schema yet (a daemon is creating it): a command has nothing to show."""

    def __init__(self, where: str) -> None:
        super().__init__(f"the store {where} is not created yet: start the daemon or run `batchd migrate`", EX_DATAERR)


# -- what crosses the contract ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileKey:
    """A spool file's identity: re-reading the same inode (not yet moved out of new/) resumes it."""

    name: str
    sha256: str
    size: int
    dev: int
    ino: int


@dataclass(frozen=True, slots=True)
class FileRow:
    id: int
    node: str
    name: str
    out_name: str
    state: FileState
    lines_committed: int  # lines 1..lines_committed are in the store (items or results)
    offset_committed: int  # byte offset in the file just after line lines_committed
    lines: int  # total lines once OPEN (0 while INGESTING)
    delivered: int  # result lines durably in the outbox
    out_bytes: int  # durable length of the outbox .part
    moved: bool  # the file has left new/
    canceled_at: float | None = None  # an operator cancelled it (`batchd cancel --file`)
    # Its per-file options (the NAME.meta.json sidecar, a JSON object) and the deadline it gave
    # (unix time), recorded with the row: a resumed ingest uses these, never a sidecar read again.
    options: str | None = None
    deadline: float | None = None


@dataclass(slots=True)
class NewItem:
    """A valid line about to be queued."""

    line: int
    custom_id: str
    profile: str
    endpoint: str
    model: str
    body: bytes
    size: int
    tokens: int = 0  # estimated enqueued tokens (capacity counters); 0 = unknown
    deadline: float | None = None  # unix time its result must exist by
    fallback_at: float | None = None  # deadline less the route's deadline_lead: real time from then on
    inputs: int = 1  # inputs an embeddings request carries (capacity.embedding_inputs)


@dataclass(frozen=True, slots=True)
class NewResult:
    """A result decided without a provider (an invalid line, a duplicate custom_id)."""

    line: int
    status: Status
    payload: bytes


@dataclass(frozen=True, slots=True)
class Chunk:
    """Lines first_line..last_line of a file, parsed; end_offset is the byte offset after last_line."""

    first_line: int
    last_line: int
    end_offset: int
    items: Sequence[NewItem]
    invalid: Sequence[NewResult]


@dataclass(frozen=True, slots=True)
class WholeFile:
    """A small spool file parsed whole (all `lines` of it, `key.size` bytes), for `Intake.add_files`."""

    key: FileKey
    lines: int
    items: Sequence[NewItem]
    invalid: Sequence[NewResult]
    options: str | None = None  # FileRow.options
    deadline: float | None = None  # FileRow.deadline


@dataclass(frozen=True, slots=True)
class Group:
    """Queued items that may share a provider batch."""

    profile: str
    endpoint: str
    model: str
    count: int
    bytes: int
    oldest: float


@dataclass(slots=True)
class BatchRow:
    """A provider batch as recorded here."""

    id: int
    profile: str
    kind: str
    endpoint: str
    model: str
    state: BatchState
    remote_id: str | None
    remote_status: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    requests: int
    bytes: int
    counts: dict[str, int] | None
    created_at: float
    submitted_at: float | None
    submit_attempts: int
    not_before: float
    last_error: str | None
    remote_created_at: float | None = None
    cancel_requested_at: float | None = None
    ended_at: float | None = None
    fate: Fate | None = None
    owner: str | None = None  # node holding the lease
    lease_until: float = 0.0
    poll_requested_at: float | None = None  # another node got a webhook for it: the lease holder polls now
    cancel_reason: CancelReason | None = None
    cancel_wanted_at: float | None = None  # an operator asked (`batchd cancel`): the lease holder cancels it
    tokens: int = 0  # estimated enqueued tokens of its requests (capacity gating)
    inputs: int = 0  # embedding inputs of its requests (OpenAI: 50,000 per embeddings batch)


# Not frozen: one is made per result line, and a frozen dataclass takes about 5x as long to make.
@dataclass(slots=True)
class SubmittedItem:
    """An item of a batch that is waiting for its provider outcome."""

    id: int
    file_id: int
    line: int
    custom_id: str
    attempts: int
    # SUBMITTED, or REALTIME: handed to the fallback, whose answer or the batch's, first, wins;
    # a final state: the fallback answered it (its billed batch answer is a duplicate cost).
    state: ItemState = ItemState.SUBMITTED
    deadline: float | None = None


# Not frozen: one is made per result line, and a frozen dataclass takes about 5x as long to make.
@dataclass(slots=True)
class FinalResult:
    """A decided final outcome of one item (composed by policy, recorded by the store)."""

    item_id: int
    file_id: int
    line: int
    status: Status
    payload: bytes  # the result line, without newline
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cost_batch: float | None = None
    cost_realtime: float | None = None
    via: str = "batch"  # Via: how it was served
    cost_paid: float | None = None  # what was actually paid (cost_batch for a batch answer)


@dataclass(frozen=True, slots=True)
class FileItem:
    """One request of a file and where it stands (`batchd retry` reads them)."""

    id: int
    line: int
    custom_id: str
    state: ItemState
    profile: str
    endpoint: str
    model: str
    deadline: float | None = None
    fallback_at: float | None = None
    tokens: int = 0
    inputs: int = 1


@dataclass(frozen=True, slots=True)
class Retry:
    """An item going back to the queue after a retryable outcome."""

    item_id: int
    not_before: float
    error: str
    refund: bool = False  # its attempt is given back (a bystander of a deadline cancel)


@dataclass(frozen=True, slots=True)
class ApplySummary:
    """What one chunk of provider outcomes did to the queue."""

    final: int = 0
    requeued: int = 0
    ignored: int = 0
    handed_over: int = 0  # to the real-time fallback
    duplicates: int = 0  # second answers recorded as duplicate costs

    def __add__(self, other: ApplySummary) -> ApplySummary:
        return ApplySummary(
            self.final + other.final,
            self.requeued + other.requeued,
            self.ignored + other.ignored,
            self.handed_over + other.handed_over,
            self.duplicates + other.duplicates,
        )


@dataclass(frozen=True, slots=True)
class RealtimeItem:
    """A request handed to the real-time fallback (state REALTIME), with its body, to send."""

    id: int
    file_id: int
    line: int
    custom_id: str
    profile: str
    endpoint: str
    model: str
    body: bytes
    tokens: int
    deadline: float | None
    batch_id: int | None  # the batch it left, if any (its late answer may still come)


@dataclass(frozen=True, slots=True)
class FallbackDue:
    """What one pass of Fallback.fallback_due changed: queued requests taken into REALTIME, and the
    live batches newly marked for a DEADLINE cancel."""

    realtime: int = 0
    batches: tuple[int, ...] = ()


# Not frozen: one is made per result line, and a frozen dataclass takes about 5x as long to make.
@dataclass(slots=True)
class PendingResult:
    """A result line waiting for a sink."""

    id: int
    file_id: int
    out_name: str
    payload: bytes
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class InputSize:
    """What a batch's request lines are made of, for their exact length before they are read:
    the number of requests, the bytes of their bodies, and the hex digits of their item ids (each
    custom_id ends with its item id in hex; formats.request_lines_size adds the fixed parts)."""

    requests: int
    body_bytes: int
    id_hex_digits: int


@dataclass(frozen=True, slots=True)
class Budget:
    """What one claim may take beyond the request and byte limits (capacity gating, issue 11).

    The running totals of the claimed items stay within `tokens` and `inputs` (None: no bound).
    With `lone_oversize`, a group whose oldest due item alone exceeds a bound gets that item as
    a batch of its own (it could never fit; capacity.split): the caller sets it when nothing of
    the route is in flight, so the bound is the whole limit, not what is left of it.
    """

    tokens: int | None = None
    inputs: int | None = None
    lone_oversize: bool = False


@dataclass(frozen=True, slots=True)
class Deadline:
    """The most urgent queued request of a group: its deadline and when its fallback is due."""

    deadline: float
    fallback_at: float


@dataclass(frozen=True, slots=True)
class Usage:
    """What a profile has at the provider right now, counted over every node (org limits)."""

    in_flight_batches: int
    enqueued_tokens: int  # estimated tokens of requests in live batches
    enqueued_requests: int
    created_last_hour: int


@dataclass(frozen=True, slots=True)
class Pause:
    """An operator's pause of submission (`batchd pause`); '*' matches any profile or model."""

    profile: str
    model: str
    paused_at: float
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PruneSummary:
    """What one retention pass removed from the database."""

    files: int = 0
    results: int = 0
    batches: int = 0

    def __add__(self, other: PruneSummary) -> PruneSummary:
        return PruneSummary(self.files + other.files, self.results + other.results, self.batches + other.batches)

    def __bool__(self) -> bool:
        return bool(self.files or self.batches)


PAUSE_UNTIL = float("inf")  # what active_holds reports for a paused route: until `batchd resume`


# -- the facets ------------------------------------------------------------------------------


class Intake(Protocol):
    """The spool's view: files and their lines, committed in short chunks."""

    node: str

    async def find_file(self, key: FileKey) -> FileRow | None:
        """This node's row for exactly this file (name, sha256, ino) not yet moved out of new/, if any."""

    async def begin_file(
        self, key: FileKey, out_taken: Callable[[str], bool], options: str | None = None, deadline: float | None = None
    ) -> FileRow:
        """Create the file's row (INGESTING, nothing committed) with its results name chosen once,
        and its per-file `options` (JSON object text) and file-given `deadline`, in one transaction.

        NAME.results.jsonl unless `out_taken(name)` or an unfinished file of this node holds it,
        else NAME.N.results.jsonl with the first free N; a COMPLETE holder whose results are gone
        gives the name up (its row keeps it as NAME.results.jsonl~ID). Call only after find_file
        said None.
        """

    async def seen_custom_ids(self, file_id: int, custom_ids: Collection[str]) -> set[str]:
        """Which of these custom_ids committed chunks of this file already hold (first one wins)."""

    async def add_chunk(self, file_id: int, chunk: Chunk) -> bool:
        """Queue the chunk's items (bodies, token estimates, inputs, deadlines and fallback times
        included), record its invalid results and advance
        lines_committed/offset_committed, in one transaction.

        Compare-and-set on lines_committed == first_line - 1: a chunk already committed returns
        False and changes nothing (idempotent after a crash or a cancellation); True when applied.
        Raises DuplicateCustomId, changing nothing, when a committed chunk of the file holds one of
        its custom_ids: the caller checks seen_custom_ids only then, not for every chunk.
        """

    async def finish_file(self, file_id: int, lines: int) -> None:
        """INGESTING -> OPEN with its final line count (durable on return). Idempotent."""

    async def add_files(
        self, files: Sequence[WholeFile], out_taken: Callable[[str], bool], moved: Collection[int] = ()
    ) -> list[FileRow]:
        """Group commit: several small files, each whole, in one durable transaction; their rows in order.

        `moved`: files that left new/ since (file_moved for them, in the same transaction).

        A file this node already has a row for (find_file: same name, sha256 and inode, not moved
        out of new/) is left as it is and its row returned: OPEN when it was committed before a
        crash (move it now), INGESTING when chunks of it were (resume it chunk by chunk). Any other
        file gets its row with a results name chosen as begin_file does (never one another file of
        the group took), its options and deadline, its items and invalid results, and is OPEN with
        `lines` lines, all of them committed.
        """

    async def files_moved(self, file_ids: Collection[int]) -> None:
        """These files left new/ (after the renames are durable). Idempotent."""

    async def file_moved(self, file_id: int) -> None:
        """The file left new/ (after the rename is durable). Idempotent."""


class Queue(Protocol):
    """The batcher's view of queued work."""

    node: str

    async def queued_groups(self, now: float) -> list[Group]:
        """Queued items with not_before <= now, grouped by (profile, endpoint, model). Items whose
        fallback_at <= now are left out: they belong to the real-time fallback, not to a batch.

        The batcher calls it every pass: it costs O(groups + items held back or due for the fallback),
        never a read of the whole queue (engines keep per-group counts; see their migrations)."""

    async def earliest_deadline(self, group: Group, now: float) -> Deadline | None:
        """The queued item of the group with the earliest fallback_at still after `now`, or None.

        Read through the partial index on fallback_at (items with a deadline that are not final),
        in its order, so it costs about one index step however long the queue is.
        """

    async def next_not_before(self, now: float) -> float | None:
        """When the next queued item held back by a backoff becomes due (one index step)."""

    async def claim_batch(
        self,
        group: Group,
        kind: str,
        max_requests: int,
        max_bytes: int,
        now: float,
        avoid_counts: frozenset[int] = frozenset(),
        lease_seconds: float = 60.0,
        budget: Budget | None = None,
    ) -> BatchRow | None:
        """Record a PENDING batch intent owned (leased) by this node and move up to the limits of the
        group's oldest due items into it, never exceeding either limit nor the `budget` (tokens,
        embedding inputs); None if nothing fits. Items whose fallback_at <= now are never claimed.
        The batch row records its requests, bytes, tokens and inputs.

        Concurrent claims (other nodes) never take the same item (FOR UPDATE SKIP LOCKED or the
        engine's single writer). A batch never gets a request count in `avoid_counts`.
        """

    def batch_bodies(self, batch_id: int, chunk: int = 2000) -> AsyncIterator[list[tuple[int, str, bytes]]]:
        """The batch's requests as (item id, endpoint, body), in chunks, in id order.

        Engines implement it as an async generator (`async def` with `yield`); declared without
        `async` here because a Protocol body has no `yield`, which would type it as a coroutine.
        """

    async def batch_input_size(self, batch_id: int) -> InputSize:
        """The sizes batch_bodies' rows add up to, without reading the bodies (a streamed upload
        declares its length before its first byte)."""

    async def usage(self, profile: str, model: str | None = None, now: float | None = None) -> Usage:
        """Live counts for organisation limits, over every node sharing the store."""

    async def creations(self, profile: str, since: float) -> list[float]:
        """When each batch of the profile was created at the provider since `since` (submitted_at),
        and the creation time of each live intent not yet created (created_at: about to be), in
        order, over every node: what a batches-per-hour limit counts."""

    async def learned_limits(self) -> dict[tuple[str, str], int]:
        """(profile, model) -> the enqueued-token limit learned from token_limit_exceeded."""

    async def lower_learned_limit(self, profile: str, model: str, tokens: int, now: float) -> int:
        """Record `tokens` as the learned limit of (profile, model) unless a lower one is stored; returns
        the limit now in force. One statement: it only ever lowers, so repeats and concurrent nodes are safe."""

    async def flush_requests(self) -> dict[str, float]:
        """Route name ('*': every route) -> when `batchd flush` asked, for requests not yet carried out."""

    async def clear_flush_request(self, route: str, requested_at: float) -> bool:
        """Forget a carried-out flush request; compare-and-set on requested_at, so a newer request for
        the route made meanwhile survives. False when it was not (or no longer) that request."""

    async def active_holds(self, now: float) -> dict[tuple[str, str], float]:
        """(profile, model) -> until, for holds still in force, and every operator pause until
        PAUSE_UNTIL, keyed by its (profile, model) where '*' matches any: match with ops.held_until."""

    async def hold(self, profile: str, model: str, until: float, failures: int, reason: str) -> None:
        """Hold back submissions for (profile, model) until `until` (policy computed the pause)."""

    async def hold_failures(self, profile: str, model: str) -> int:
        """How many consecutive failures the current hold counts (0 if none)."""

    async def release_hold(self, profile: str, model: str) -> None: ...


class Batches(Protocol):
    """Batch records, their leases, and everything the batcher and pollers note about them."""

    node: str

    async def batch(self, batch_id: int) -> BatchRow | None: ...

    async def batches_in_state(self, *states: BatchState) -> list[BatchRow]:
        """Every batch in these states, whoever owns it, by id."""

    async def owned_batches(self, *states: BatchState) -> list[BatchRow]:
        """Batches in these states whose lease this node holds."""

    async def take_over(self, lease_seconds: float, now: float) -> list[BatchRow]:
        """Take the lease of every live batch whose lease has expired (its node died); returns them."""

    async def renew_leases(self, lease_seconds: float, now: float) -> int:
        """Extend this node's leases on its live batches (and its node heartbeat); returns how many."""

    async def release_leases(self) -> None:
        """Give up this node's leases at a graceful stop, so another node may take over at once."""

    async def remote_ids(self, profile: str) -> set[str]: ...

    async def remote_owner(self, remote_id: str) -> int | None: ...

    async def set_input_file(self, batch_id: int, input_file_id: str | None) -> None: ...

    async def note_submit_failure(self, batch_id: int, error: str, retry_at: float) -> None: ...

    async def mark_submitted(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None = None
    ) -> None:
        """PENDING -> SUBMITTED with its remote id, and attempts + 1 for each of its BATCHED items."""

    async def mark_unverified(
        self, batch_id: int, remote_id: str, remote_status: str, now: float, remote_created_at: float | None
    ) -> None: ...

    async def confirm_ownership(self, batch_id: int) -> None: ...

    async def unadopt(self, batch_id: int, remote_id: str, reason: str) -> None: ...

    async def rejected_remotes(self, batch_id: int) -> set[str]: ...

    async def note_cancel_requested(
        self, batch_id: int, error: str, reason: CancelReason = CancelReason.EXPIRY
    ) -> None:
        """The provider was asked to cancel the batch (cancel_requested_at, once), and why."""

    async def canceled_files(self, batch_id: int) -> set[int]:
        """The files with requests in this batch that an operator cancelled (`batchd cancel --file`)."""

    async def batched_items(self, batch_id: int) -> list[SubmittedItem]:
        """A PENDING batch's requests (BATCHED: claimed, not yet sent), by id."""

    async def drop_pending(
        self, batch_id: int, finals: Sequence[FinalResult], fate: Fate, error: str, now: float
    ) -> tuple[int, int]:
        """A PENDING batch never created at the provider (a cancel came first) ends unsent, in one
        transaction: `finals` (results composed by policy) for those of its BATCHED requests they
        name, every other BATCHED request back to the queue (attempts and age unchanged), and the
        batch DONE with `fate` and `error`. Compare-and-set on the batch still PENDING: otherwise
        nothing changes and (0, 0) is returned. Returns (finals recorded, requests requeued)."""

    async def canceled_with_queued(self) -> list[int]:
        """Files an operator cancelled that still hold requests out of any batch and without a result
        (queued or REALTIME), by id: requeued by a collection that read the batch before the cancel."""

    async def record_poll(
        self,
        batch_id: int,
        remote_status: str,
        counts: dict[str, int] | None,
        output_file_id: str | None,
        error_file_id: str | None,
        ended: bool = False,
    ) -> None: ...

    async def note_batch_error(self, batch_id: int, event: str, error: str) -> None: ...

    async def finish_batch(
        self, batch_id: int, fate: Fate | None = None, error: str | None = None, record: bool = True
    ) -> None: ...

    async def request_poll(self, batch_id: int, now: float) -> None:
        """Ask the node holding a polled batch's lease to poll it now (it reads `poll_requested_at` at
        its next lease renewal): a webhook that reached another node. Idempotent; no-op once done."""


class Outcomes(Protocol):
    """Recording what the provider answered, as decided by policy outside the store."""

    async def submitted_items(self, batch_id: int, item_ids: Collection[int] | None = None) -> list[SubmittedItem]:
        """The batch's items still waiting for an outcome (all of them, or those among `item_ids`), by id."""

    async def record_outcomes(
        self,
        batch_id: int,
        finals: Sequence[FinalResult],
        retries: Sequence[Retry],
        handovers: Collection[int] = (),
    ) -> ApplySummary:
        """Finals become results (their bodies are dropped), retries go back to the queue (with their
        attempt given back when `refund`), and `handovers` (item ids) go to the real-time fallback
        (REALTIME, bodies kept), in one transaction.

        An item waits in this batch while SUBMITTED or REALTIME in it (the first final answer wins):
        a final applies to either; a retry or a handover only to a SUBMITTED one. A final for an item
        whose result was already served the other way (`via` differs: the fallback answered first)
        is no result but a duplicate_costs row (its tokens and cost_paid), once per (item, via,
        batch). Idempotent: anything else is skipped (counted ignored). A retry's age counts from
        when it becomes due (queued_at = max(now, not_before))."""

    async def fallback_answered(self, batch_id: int) -> list[SubmittedItem]:
        """The batch's items whose final result the real-time fallback made (state is their final
        state), by id: a billed batch answer for one of them is a duplicate cost."""

    async def refund_batch(self, batch_id: int, not_before: float, error: str) -> int:
        """Every SUBMITTED item of the batch back to the queue with its attempt given back (the provider
        never ran them), in one statement so that a repeat cannot refund twice. Returns how many."""

    async def batch_item_ids(self, batch_id: int) -> list[int]:
        """The batch's items in the order of its input file."""


class Fallback(Protocol):
    """The real-time fallback's view: requests whose deadline (less its lead) has come."""

    node: str

    async def fallback_due(self, now: float) -> FallbackDue:
        """One transaction: this node's files' QUEUED items with fallback_at <= now become REALTIME;
        every live batch (any node's) holding a BATCHED or SUBMITTED item with fallback_at <= now
        and no cancel reason yet (or only EXPIRY) is marked for a DEADLINE cancel (cancel_wanted_at,
        poll_requested_at, as request_cancel does; OPERATOR and FILE are never overridden).
        Idempotent: a repeat changes nothing and returns only what it changed."""

    async def next_fallback_at(self, now: float) -> float | None:
        """The earliest fallback_at after `now` of an item not yet final nor REALTIME (None: none)."""

    async def hand_over(self, batch_id: int) -> int:
        """Every SUBMITTED item of the batch with a deadline becomes REALTIME (its batch kept, its body
        too): the cancelled batch did not end within cancel_wait. One statement; how many."""

    async def realtime_items(self, limit: int, exclude: Collection[int] = ()) -> list[RealtimeItem]:
        """Up to `limit` REALTIME items of this node's files, not among `exclude`, earliest deadline first."""

    async def record_realtime(self, finals: Sequence[FinalResult]) -> ApplySummary:
        """The fallback's answers, in one transaction: a final applies to an item still REALTIME (it
        becomes final, its body goes, its result is written with `via`, `cost_paid` and the item's
        deadline); for an item whose result a batch answer already made, it is a duplicate_costs
        row (once per item and via); anything else is ignored. Idempotent."""


class Delivery(Protocol):
    """Sinks: results after a cursor, cursors, parking, and the outbox's per-file progress."""

    node: str

    async def sink_cursor(self, sink: str) -> int: ...

    async def results_after(self, last_id: int, limit: int, node: str | None = None) -> list[PendingResult]:
        """Results with id > last_id in id order; with `node`, only those of files that node ingested."""

    async def advance_cursor(self, sink: str, last_id: int) -> None: ...

    async def park(self, sink: str, result_ids: Sequence[int], error: str, advance_to: int | None) -> None: ...

    async def to_redeliver(self, sink: str, limit: int) -> list[PendingResult]: ...

    async def unpark(self, sink: str, result_ids: Sequence[int]) -> None: ...

    async def request_redelivery(self, sink: str | None) -> int: ...

    async def take_sink_lease(self, sink: str, lease_seconds: float, now: float) -> bool:
        """Whether this node holds (took or renewed) the lease to deliver `sink` (shared sinks)."""

    async def outbox_delivered(self, sink: str, last_id: int, files: dict[int, tuple[int, int]]) -> None:
        """Advance the outbox cursor `sink`; `files` maps file id to (lines added, new durable .part length)."""

    async def open_files(self) -> list[FileRow]:
        """This node's files whose results are not yet complete."""

    async def file(self, file_id: int) -> FileRow | None: ...

    async def files_by_id(self, file_ids: Iterable[int]) -> dict[int, FileRow]: ...

    async def delivered_payloads(self, file_id: int, after_id: int, limit: int) -> list[tuple[int, bytes]]: ...

    async def complete_file(self, file_id: int) -> None: ...


class Reporting(Protocol):
    """Read models for commands and the status view; recent errors."""

    async def instance_id(self) -> str:
        """The id of this store (shared by every node); provider custom_ids carry it."""

    async def add_error(self, event: str, message: str) -> None: ...

    async def report(self, since: float, by: str) -> list[dict[str, Any]]: ...

    async def query_results(
        self, file: str | None, custom_id: str | None, status: str | None, limit: int
    ) -> list[dict[str, Any]]: ...

    async def status(self, errors: int = 10) -> dict[str, Any]: ...

    async def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Database-wide aggregates for /metrics, one list of rows per name in METRICS_READS (plain
        ints and floats, whatever the engine): queue (profile, endpoint, model, queued, oldest),
        batches (profile, state, status, n), results (profile, model, status, n, collected, tokens,
        cost_batch, cost_realtime), retries (profile, model, retries), capacity (profile, model,
        batches, tokens, requests: live batches), turnaround (profile, model, seconds: submitted to
        collected), turnaround_pruned (profile, family 'turnaround' with bucket: the index in
        TURNAROUND_BUCKETS, -1 past the last, and value: a count; or 'turnaround_sum' with value: the
        seconds), ingested (files, lines), and sinks (sink, pending, parked) as in status().

        Every counter (batches finished, results, tokens, spend, retries, turnaround, ingested) keeps
        what prune_finished deleted: it never goes down."""


class Operations(Protocol):
    """What operators' commands change beside the daemon (they act through the store), and retention."""

    async def pause(self, profile: str, model: str, reason: str | None = None) -> bool:
        """Pause submission for (profile, model) ('*' for any) until resume; False if already paused. Idempotent."""

    async def resume(self, profile: str | None = None, model: str | None = None) -> int:
        """Lift the pause of exactly (profile, model), or every pause when profile is None; how many were lifted."""

    async def pauses(self) -> list[Pause]:
        """Every operator pause in force."""

    async def request_flush(self, route: str, now: float) -> None:
        """`batchd flush [ROUTE]`: ask the batcher to flush the route's queue at its next pass ('*':
        every route). A repeat moves requested_at to `now` (the batcher clears by compare-and-set)."""

    async def recent_batches(self, limit: int) -> list[BatchRow]:
        """The newest `limit` batches in any state, newest first, whoever owns them."""

    async def request_cancel(self, batch_id: int, reason: CancelReason, now: float) -> bool:
        """Record an operator's wish to cancel a live batch (the lease holder acts on it at its next lease
        renewal, through poll_requested_at). OPERATOR outranks FILE. False if the batch is not live.
        Idempotent."""

    async def files_named(self, name: str) -> list[FileRow]:
        """Every file row of this input file name (any node, any state), oldest first."""

    async def queued_items(self, file_id: int) -> list[SubmittedItem]:
        """The file's items not in a batch and without a result: queued, or REALTIME (waiting for the
        real-time fallback), by id."""

    async def file_items(self, file_id: int) -> list[FileItem]:
        """Every request of the file (not its invalid lines), by line, with its deadline, fallback time,
        token estimate and inputs as queued."""

    async def cancel_file(self, file_id: int, finals: Sequence[FinalResult], now: float) -> tuple[int, list[int]]:
        """`batchd cancel --file`, in one transaction: mark the file cancelled, record `finals` (canceled
        results composed by policy) for those of its items still QUEUED (others are skipped), and
        request_cancel(FILE) every live batch holding its requests. Its REALTIME items end canceled too
        (an answer already on its way is then a duplicate cost, see record_realtime). Returns (finals recorded, those
        batches' ids by id). Idempotent."""

    async def prune_finished(self, before: float, limit: int = 100, sinks: Collection[str] = ()) -> PruneSummary:
        """Delete up to `limit` files completed before `before` (with their items and results; never a
        file with parked results, nor one with a result that one of `sinks` has not delivered yet: the
        configured webhook sinks, by cursor) and up to `limit` done batches ended before it that no
        item names, in one transaction that first folds the results into the report totals (`report`
        counts them still) and what /metrics counts into its totals. The file and batch holding the
        largest file, item, result and batch ids stay until newer ones exist: SQLite would hand those
        ids out again, below the queue counts' mark and the sinks' cursors. Call again while it
        returns a non-empty summary."""


class Store(Intake, Queue, Batches, Outcomes, Fallback, Delivery, Reporting, Operations, Protocol):
    """Everything, plus the lifecycle. Engines: SQLiteStore (store/sqlite.py), PostgresStore (store/postgres.py)."""

    url: str

    async def open(self) -> None:
        """Connect, migrate to the latest schema under a lock (refusing a newer one), register the node."""

    async def open_existing(self, writable: bool = False) -> None:
        """Connect for a command: never create, never migrate; refuse an older or newer schema."""

    async def close(self) -> None: ...

    async def migrate(self) -> tuple[int, int]:
        """Apply pending migrations under the engine's lock; (version before, version after)."""
