"""Prefix-aware eviction: the block least likely to be used again goes first, leaves before roots.

What it does. A block's *class* is how many times it was used again since it
was stored (0, 1, 2, 3, 4 or more). Each class keeps its blocks in one
intrusive list in order of last use, so the front of a class is its stalest
block. The victim is the front least likely to be used again,

    P(used again | class, idle age), equal odds: the stalest,

and the walk gives that block's subtree first, deepest first, then the block.

- Reuse-aware: P is counted online from this tier's own history. A use of a
  block idle for ``a`` inserts is a reuse at age ``a``; an evicted block is
  remembered as a ghost (its key, class and last use; ``GHOSTS`` per slot), and
  a ghost that comes back is a reuse at its age too; a ghost that is forgotten
  is a block that never came back. Then P(class, a) = reuses at ages >= a /
  (those + never back), interpolated between age buckets. It falls with age,
  so the front of a class is its least valuable block (victims are O(1): a
  look at five fronts), and it is made non-decreasing in the class (a block
  used more often is never worth less). Where the history has seen no reuse
  that late, P is 0 for every class and the stalest goes first. Counts are
  halved every ``WINDOW`` outcomes per slot, so P follows the workload. Nothing
  is fitted to a trace: with no history every P is 1/2 and the policy is LRU;
  ages count blocks inserted, i.e. cache turnover, on any hardware and load.
- Cost, measured and left out of the ranking: a hit on a block saves its
  prefill, whose attention part grows with the block's position (for a dense
  transformer of width d a token's matmuls cost ~24·d² FLOPs a layer and its
  attention over c earlier tokens ~4·c·d, equal at c = 6·d: ~32k tokens). This
  policy ranked by P x (1 + position / 32k tokens) until 2026-12-07, and that
  lost prefill compute: replayed with positions in tokens, as a connector
  sends them (the trace benchmark's one-token blocks had hidden it: their
  positions are block indices, a cost of ~1), on Mooncake's trace and the four
  synthetic traces of ``tiercache.bench.synth`` (seed 0) at 1, 2, 5 and 10% of
  the working set, compute saved (each hit block weighted by its cost) was
  lower with the cost in 11 of 20 cells, higher in 5 and 0.37 points lower on
  average (Mooncake at 1%: 5.8% against 6.5%, hit ratio 7.3% against 8.1%;
  synthetic chat at 5%: 23.4% against 25.9%). Deep blocks belong to long
  prompts, and long prompts come back less often (23.5% of Mooncake's requests
  with more than 64 new blocks against 51% with one), which P per class does
  not see; correcting P by the odds learned per class and position (six
  buckets of doubling length) did no better (compute saved 6.2% at 1% and
  19.6% at 5%, against 6.5% and 20.0% without the cost).
- Prefix-aware: hits are contiguous prefixes, so a block is worth nothing
  without its parent. A chain touched root to leaf is laid leaf-oldest (a
  child lands just ahead of its parent), a chosen block goes only after its
  subtree, so a chain is trimmed from its end; and a block whose parent
  leaves the tier anyway (pinned or leased children, an explicit evict) is an
  orphan, evicted before anything else, touched, held or released, until its
  parent comes back (promoted from disk, say) and adopts it again. The parent
  must be told: an engine that serves a prefix from its own cache must
  ``touch`` it here, or the prefix's root ages out and every chain under it
  becomes an orphan.
- Session-aware: ``retain(key, seconds)`` holds a block out of the victims
  until ``seconds`` after its last use, each use starting the window again, as
  hosted prompt caching keeps a prefix for minutes after its last hit;
  ``math.inf`` is a pin. Held blocks go last, earliest deadline first, so
  pinned blocks cost the walk nothing. The rooms pin a pinned session's blocks
  (``room.hold``); no caller sets a finite window yet (a session's TTL forgets
  the session at its deadline instead).

Why. On Mooncake's conversation trace the chance that a block comes back rises
with its uses (24%, 42%, 50%, 58%, 65%, 78% after 0..5 uses) while the time it
takes to come back does not (a median of ~450 requests for every class); so
the policy keeps used blocks longer, by as much as the history says they are
worth at their age, and learns it again on any other workload.

Rejected, each measured on a replay of that trace at 5% of the working set (LRU 19.5%,
ARC 21.3% before it kept the paper's ghost bounds, 20.9% since; this policy 21.6%) with an
exploration harness that reproduced the benchmark's LRU and ARC numbers exactly: GreedyDual over the same classes with learned
values (21.8% at 5%, but 7.8% and 11.0% at 1% and 2% against 7.9% and 11.7%; fitted
offline it does no better, 21.9%: its lifetimes are linear in the value); LHD's hit
density with random sampling (13-16%: sampled victims cut chains in the middle); S3-FIFO
(18.9%: reuses here are hundreds of requests apart, past its small FIFO); per-class TTLs
from a knapsack over the reuse-time distributions (20.6%); classes split further by
position, prompt length or the last inter-turn gap (no gain: each class learns from
fewer samples); LIRS-style admission on a second use (it loses every first reuse, 42% of
this trace's hits); a new block taking its parent's use count (19.6%; capped at 2,
21.5%; as a flag, 21.65% against 21.63%: a chain's blocks come back together, but a
prompt that continues a stored prefix beyond its first block has its new blocks come
back less often, 12-19%, than one that shares only its first, 28%); ages in the trace's
own time instead of blocks inserted (21.78% against 21.62%, and a clock the tier would
have to be fed); four ghosts a slot instead of two (a longer memory of reuses: Mooncake
10.5% and 13.5% at 1% and 2% against 8.1% and 11.7%, but 21.35% at 5%, and lower in 9 of
the 16 cells of the synthetic traces, agents at 1% by 2 points). Of the 9,619 requests
with new blocks, 39.6% have one of them in a later prompt: 51% of those with one new
block, 23.5% of those with more than 64, while the reply's length (34-46% by bucket) and
the shared prefix's (37-52%) say less. Splitting class 0 by the count of new blocks its
save brought (which a save knows) lost too: 21.50% with four buckets (1, 2-4, 5-16,
more), 20.41% with two (1-2, more). With perfect knowledge of which blocks come back at
all, LRU reaches the ceiling at 5%; nothing a block's history shows predicts that well
(every signal a cache sees, in one logistic model fitted on the whole trace, ranks next
turns at an AUC of 0.66: ``scripts/trace_study.py``). What there is to predict is a
request's: its new blocks (the last one aside) all come back, or none do (3,324 requests
all, 5,953 none, 342 in between), and a prompt's last block, partial in all but 22
requests, comes back 0.7% of the time (an engine saves whole blocks only; the replay
stores the trace's hash ids as they are). Two more, measured 2026-12-07 on that trace and
the synthetic ones (seed 0; chat also seeds 1 and 2) at 1, 2, 5 and 10%: a class of its
own for a save's last block while nothing extends it (that partial block, learned online
to come back 1% of the time, goes first): Mooncake 8.4 / 11.7 / 22.0 / 29.3% against
7.9 / 11.7 / 21.6 / 29.1%, but chat at 5% 26.2, 25.2 and 26.6% against 27.1, 26.5 and
26.4%, and agents at 2% 53.8% against 55.7%; an engine saves whole blocks only, so the
gain is the trace format's. And LHD's hit density (reuses within a horizon over the time
held) in place of the odds, with the classes and walk kept: 21.4-21.6% at 5% for horizons
of 0.5 to 4 capacities. Perturbing WINDOW (7.5, 8.5) or GHOSTS up (2.1) moves Mooncake at
2 and 5% by at most 0.13 points; GHOSTS 1.9 costs 0.9 points at 5% (a shorter memory of
reuses).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tiercache.keys import BlockKey
from tiercache.policy.links import Link, Links

MAX_CLASS = 4  # "used again 4 times or more"
AGE_STEPS = 4  # age buckets per doubling
AGE_BUCKETS = 128  # ages up to 2^33 blocks inserted
GHOSTS = 2  # ghost keys per slot: reuses up to ~3 cache lifetimes after a use are seen
WINDOW = 8  # outcomes per slot before the counts are halved


def _bucket(age: int) -> int:
    if age < AGE_STEPS:
        return age
    bits = age.bit_length()
    return min(AGE_BUCKETS - 1, AGE_STEPS * (bits - 2) + ((age >> (bits - 3)) & 3))


def _bucket_start(bucket: int) -> int:
    if bucket < AGE_STEPS:
        return bucket
    bits = bucket // AGE_STEPS + 2
    return (AGE_STEPS + bucket % AGE_STEPS) << (bits - 3)


@dataclass(slots=True, eq=False)
class _Block(Link):
    parent: _Block | None = None
    kids: dict[_Block, None] | None = None  # in the order they came
    uses: int = 0  # times used again since stored (or since its ghost's first store)
    last: int = 0  # the policy's clock at its last use
    ttl: float | None = None  # a retention window, refreshed on use
    deadline: float = 0.0
    orphan_of: BlockKey | None = None  # the parent that left the tier while this block stayed


@dataclass(slots=True, eq=False)
class _Ghost(Link):
    uses: int = 0
    last: int = 0
    parent: BlockKey | None = None


class PrefixPolicy:
    name = "prefix"

    def __init__(
        self, capacity_blocks: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity_blocks <= 0:
            raise ValueError("the prefix policy needs a positive capacity in blocks")
        self.capacity = capacity_blocks
        self._now = clock  # for retention deadlines only
        self._blocks: dict[BlockKey, _Block] = {}
        self._classes: list[Links[_Block]] = [Links() for _ in range(MAX_CLASS + 1)]
        self._orphans: Links[_Block] = Links()
        self._orphans_of: dict[BlockKey, dict[_Block, None]] = {}  # departed parent -> kids
        self._held: dict[float, Links[_Block]] = {}  # retained blocks by window, by last use
        self._ghosts: Links[_Ghost] = Links()
        self._ghost_of: dict[BlockKey, _Ghost] = {}
        # Per class: reuses seen at an age bucket >= b (a suffix count), and blocks never back.
        self._reused = [[0.0] * AGE_BUCKETS for _ in range(MAX_CLASS + 1)]
        self._never = [0.0] * (MAX_CLASS + 1)
        self._outcomes = 0.0
        self._tick = 0  # blocks inserted so far: the clock ages are measured in
        self._last: _Block | None = None  # the block placed last (its child goes ahead of it)

    # -- what the tier reports ---------------------------------------------------------

    def insert(self, key: BlockKey, parent: BlockKey | None = None, position: int = 0) -> None:
        if key in self._blocks:
            self.touch(key)
            return
        self._tick += 1
        block = _Block(key, last=self._tick)
        ghost = self._ghost_of.pop(key, None)
        if ghost is not None:
            self._ghosts.unlink(ghost)
            self._outcome(ghost.uses, self._tick - ghost.last)
            block.uses = ghost.uses + 1
            parent = parent if parent is not None else ghost.parent
        up = self._blocks.get(parent) if parent is not None else None
        if up is not None:
            block.parent = up
            if up.kids is None:
                up.kids = {}
            up.kids[block] = None
        self._blocks[key] = block
        self._place(block)
        for kid in self._orphans_of.pop(key, ()):  # the parent is back: its prefix is whole
            kid.orphan_of = None
            kid.parent = block
            if block.kids is None:
                block.kids = {}
            block.kids[kid] = None
            if kid.ttl is None:  # out of the orphans: its prefix was just asked for again
                self._unlink(kid)
                self._classes[min(kid.uses, MAX_CLASS)].push(kid)

    def touch(self, key: BlockKey) -> None:
        block = self._blocks.get(key)
        if block is None:
            return
        if block.last < self._tick:  # touches with no insert in between are one use
            self._outcome(block.uses, self._tick - block.last)
            block.uses += 1
            block.last = self._tick
        if block.ttl is not None:
            block.deadline = self._now() + block.ttl
        self._unlink(block)
        self._place(block)

    def remove(self, key: BlockKey) -> None:
        block = self._blocks.pop(key, None)
        if block is None:
            return
        self._unlink(block)
        if self._last is block:
            self._last = None
        if block.parent is not None and block.parent.kids is not None:
            block.parent.kids.pop(block, None)
        if block.orphan_of is not None:
            kids = self._orphans_of[block.orphan_of]
            del kids[block]
            if not kids:
                del self._orphans_of[block.orphan_of]
        if block.kids:
            self._orphans_of[key] = dict(block.kids)
        for kid in block.kids or ():
            kid.parent = None
            kid.orphan_of = key
            if kid.ttl is None:
                self._unlink(kid)
                self._orphans.push(kid)
        ghost = _Ghost(
            key,
            uses=block.uses,
            last=block.last,
            parent=None if block.parent is None else block.parent.key,
        )
        self._ghost_of[key] = ghost
        self._ghosts.push(ghost)
        self._forget_ghosts()

    def resize(self, capacity_blocks: int) -> None:
        """The tier holds ``capacity_blocks`` when full from now on (its mix of block sizes
        changed): ghosts beyond ``GHOSTS`` a slot are forgotten (blocks never back), and the
        counts are halved every ``WINDOW`` outcomes a slot of the new size."""
        if capacity_blocks <= 0:
            raise ValueError("the prefix policy needs a positive capacity in blocks")
        self.capacity = capacity_blocks
        self._forget_ghosts()

    def _forget_ghosts(self) -> None:
        while len(self._ghosts) > GHOSTS * self.capacity:
            oldest = self._ghosts.first()
            assert oldest is not None
            self._ghosts.unlink(oldest)
            del self._ghost_of[oldest.key]
            self._outcome(oldest.uses, None)

    def retain(self, key: BlockKey, seconds: float | None) -> None:
        """Hold ``key`` until ``seconds`` after its last use (``math.inf``: pinned; ``None``:
        released). Unknown keys are ignored: call it again after the block is inserted."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a retention window must be positive seconds, got {seconds}")
        block = self._blocks.get(key)
        if block is None:
            return
        self._unlink(block)
        block.ttl = seconds
        if seconds is not None:
            block.deadline = self._now() + seconds
        self._place(block)

    # -- what it answers ---------------------------------------------------------------

    def victims(self) -> Iterator[BlockKey]:
        self._release_expired()
        return self._walk()

    def odds(self, key: BlockKey) -> float:
        """What the walk compares for a resident block: its reuse odds at its age now."""
        return self._rank(self._blocks[key])[0]

    def reuse_odds(self, uses: int, age: int) -> float:
        """The learned chance that a block used ``uses`` times and idle for ``age`` inserts is
        used again. Between bucket edges the count of later reuses is interpolated, so an
        older block is worth strictly less wherever reuses were seen (a class's stale front
        is not tied with a fresher one of another class for a whole bucket)."""
        bucket = _bucket(age)
        start, end = _bucket_start(bucket), _bucket_start(bucket + 1)
        part = min(1.0, (age - start) / (end - start))
        odds = 0.0
        for cls in range(min(uses, MAX_CLASS) + 1):
            row = self._reused[cls]
            nxt = row[bucket + 1] if bucket + 1 < AGE_BUCKETS else 0.0
            later = row[bucket] - part * (row[bucket] - nxt)
            outcomes = later + self._never[cls]
            odds = max(odds, later / outcomes if outcomes else 0.5)
        return odds

    def __len__(self) -> int:
        return len(self._blocks)

    # -- inside ------------------------------------------------------------------------

    def _rank(self, block: _Block) -> tuple[float, int]:
        """What the walk compares, lowest first: the reuse odds, then the last use (equal
        odds, e.g. ages past every reuse the history has seen, go stalest first)."""
        return self.reuse_odds(block.uses, self._tick - block.last), block.last

    def _place(self, block: _Block) -> None:
        if block.ttl is not None:
            self._held.setdefault(block.ttl, Links()).push(block)
            return
        if block.orphan_of is not None:  # touched or released, it is still worth nothing
            self._orphans.push(block)
            self._last = None
            return
        order = self._classes[min(block.uses, MAX_CLASS)]
        up = block.parent
        if up is not None and up is self._last and up.owner is order:
            order.insert_before(block, up)  # leaf-first: the child goes before its parent
        else:
            order.push(block)
        self._last = block

    def _unlink(self, block: _Block) -> None:
        owner = block.owner
        if owner is None:
            return
        owner.unlink(block)
        if block.ttl is not None and not owner and self._held.get(block.ttl) is owner:
            del self._held[block.ttl]  # one list per window in use, not per window ever seen

    def _outcome(self, uses: int, age: int | None) -> None:
        """A block of class ``uses`` came back at ``age`` (or, ``None``, never)."""
        cls = min(uses, MAX_CLASS)
        if age is None:
            self._never[cls] += 1
        else:
            row = self._reused[cls]
            for b in range(_bucket(age) + 1):
                row[b] += 1
        self._outcomes += 1
        if self._outcomes > WINDOW * self.capacity:
            self._outcomes /= 2
            self._never = [n / 2 for n in self._never]
            self._reused = [[n / 2 for n in row] for row in self._reused]

    def _release_expired(self) -> None:
        if not self._held:
            return
        now = self._now()
        for held in list(self._held.values()):
            while (block := held.first()) is not None and block.deadline <= now:
                self._unlink(block)  # and the window's list, once it empties
                block.ttl = None
                if block.orphan_of is not None:
                    self._orphans.push(block)
                else:
                    self._classes[min(block.uses, MAX_CLASS)].push_front(block)

    def _walk(self) -> Iterator[BlockKey]:
        given: set[BlockKey] = set()  # a block is reached both as a front and in a subtree
        more = True
        while more:  # again if the caller's removals orphaned more blocks behind the walk
            more = False
            for block in self._orphans.walk():
                if block.key not in given:
                    more = True
                    given.add(block.key)
                    yield block.key
        kids: dict[_Block, Iterator[_Block]] = {}  # where each parent's kids were left off
        fronts = [order.first() for order in self._classes]
        ranks: list[tuple[float, int] | None] = [None] * len(fronts)
        while True:
            best, best_rank = -1, (0.0, 0)
            for i, order in enumerate(self._classes):
                front = fronts[i]
                if front is not None and front.owner is not order:  # gone since: walk on
                    front, ranks[i] = order.resume(front) or order.first(), None
                while front is not None and front.key in given:
                    front, ranks[i] = order.after(front), None
                fronts[i] = front
                if front is None:
                    continue
                rank = ranks[i] = ranks[i] or self._rank(front)
                if best < 0 or rank < best_rank:
                    best, best_rank = i, rank
            if best < 0:
                break
            top = fronts[best]
            assert top is not None
            fronts[best], ranks[best] = self._classes[best].after(top), None
            for block in self._leaves_first(top, given, kids):
                given.add(block.key)
                yield block.key
        yield from self._walk_held()

    @staticmethod
    def _leaves_first(
        top: _Block, given: set[BlockKey], kids: dict[_Block, Iterator[_Block]]
    ) -> Iterator[_Block]:
        """``top`` and its subtree, every block after its descendants, so a chain is trimmed
        from its end; held blocks, blocks gone and blocks ``given`` already are passed over.
        ``kids`` keeps, per parent, where this walk left off in its children, so each child
        is looked at once per walk (a shared prefix with thousands of children included):
        O(1) a victim."""
        at = top
        while True:
            left = kids.get(at)
            if left is None:
                left = kids[at] = iter(list(at.kids or ()))
            kid = next(
                (k for k in left if k.owner is not None and k.ttl is None and k.key not in given),
                None,
            )
            if kid is not None:
                at = kid
                continue
            up = at.parent
            yield at
            if at is top or up is None:
                return
            at = up

    def _walk_held(self) -> Iterator[BlockKey]:
        """Held blocks, earliest deadline first: a merge of the windows' lists (each in order
        of last use, so of deadline), O(windows in use) a victim."""
        fronts = {ttl: (held, held.first()) for ttl, held in self._held.items()}
        while True:
            for window, (held, front) in fronts.items():
                if front is not None and front.owner is not held:  # gone since: walk on
                    fronts[window] = (held, held.resume(front))
            ttl = min(
                (t for t, (_, b) in fronts.items() if b is not None),
                key=lambda t: (fronts[t][1].deadline, t),  # type: ignore[union-attr]
                default=None,
            )
            if ttl is None:
                return
            held, block = fronts[ttl]
            assert block is not None
            fronts[ttl] = (held, held.after(block))
            yield block.key
