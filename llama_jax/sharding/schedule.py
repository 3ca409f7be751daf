"""Pipeline schedules as static tables: which unit of work each pipeline stage runs at each tick.

A model of L layers is cut into C = P x V chunks of consecutive layers (P pipeline stages, V virtual stages
each); chunk c runs on stage c % P (the interleaved placement of Narayanan et al. 2021, which Llama 3 uses).
A unit is (microbatch m, chunk c). At every tick every stage may run one forward (F) and then one backward (B)
of a unit; the backward recomputes the chunk's forward from its stashed input (remat at chunk granularity)
and is costed `B_COST` forwards. Between ticks, every stage sends its F output to the next stage and its input
gradient to the previous one (a ring: the last stage's output goes back to stage 0 for the next virtual
stage).

Schedules (`build(stages, virtual, microbatches, name)`):
  * "gpipe": every forward first, then every backward (Huang et al. 2019), in lockstep; every stage keeps the
    inputs of all its units until the backward phase.
  * "1f1b": one forward and one backward per tick as soon as they are ready: forwards in Megatron's interleaved
    order (groups of P microbatches, virtual stage by virtual stage), backwards first-ready-first. With V = 1
    this is the one-forward-one-backward schedule of PipeDream-Flush; with V > 1 the interleaved 1F1B that Llama
    3 uses. A stage keeps far fewer inputs alive than under GPipe once microbatches outnumber stages.

Both have the bubble fraction (P - 1) / (V M + P - 1) when M is a multiple of P (`bubble_formula`), which
`Schedule.bubble` measures from the table itself. The table also gives the buffers the executor needs (slots
for arriving activations and gradients) and the peak number of stashed inputs per stage (`Schedule.stash`), the
activation memory the planner counts. Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SCHEDULES = ("1f1b", "gpipe")
DEFAULT_SCHEDULE = "1f1b"
F_COST, B_COST = 1.0, 3.0  # a chunk's forward; its backward with the forward recomputed (about 1 + 2)

# Columns of `Schedule.table` [ticks, stages, len(FIELDS)]; -1 where a stage has nothing to do.
FIELDS = ("f_micro", "f_virtual", "f_slot",  # forward: microbatch, virtual stage, input slot (-1: embed tokens)
          "b_micro", "b_virtual", "b_slot", "b_gslot",  # backward: its input slot and incoming-gradient slot
          "recv_slot", "recv_gslot")  # where this tick's arriving activation / gradient is kept
COL = {name: i for i, name in enumerate(FIELDS)}


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    stages: int
    virtual: int
    microbatches: int
    table: np.ndarray  # int32 [ticks, stages, fields]
    slots: int  # activation slots per stage (arrived inputs kept until their backward)
    gslots: int  # gradient slots per stage

    @property
    def ticks(self) -> int:
        return self.table.shape[0]

    @property
    def stash(self) -> list[int]:
        """Peak number of chunk inputs each stage keeps for its backward passes (activation memory)."""
        t = self.table
        peaks = []
        for s in range(self.stages):
            live, peak = 0, 0
            for k in range(self.ticks):
                live += int(t[k, s, COL["f_micro"]] >= 0)
                peak = max(peak, live)
                live -= int(t[k, s, COL["b_micro"]] >= 0)
            peaks.append(peak)
        return peaks

    def time(self, f_cost: float = F_COST, b_cost: float = B_COST) -> float:
        """Length of the schedule in forward-chunk units: a tick lasts as long as its slowest stage."""
        t = self.table
        has_f = (t[:, :, COL["f_micro"]] >= 0).any(axis=1)
        has_b = (t[:, :, COL["b_micro"]] >= 0).any(axis=1)
        return float(has_f.sum() * f_cost + has_b.sum() * b_cost)

    def bubble(self, f_cost: float = F_COST, b_cost: float = B_COST) -> float:
        """Fraction of the schedule's time a stage is idle (every stage does V M forwards and backwards)."""
        busy = self.virtual * self.microbatches * (f_cost + b_cost)
        return 1.0 - busy / self.time(f_cost, b_cost)


def bubble_formula(stages: int, virtual: int, microbatches: int) -> float:
    """(P - 1) / (V M + P - 1): the idle fraction of a pipeline of P stages, V virtual stages, M microbatches."""
    return (stages - 1) / (virtual * microbatches + stages - 1)


def check(stages: int, virtual: int, microbatches: int, name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if stages < 1 or virtual < 1 or microbatches < 1:
        raise ValueError(f"pipeline stages, virtual stages and microbatches must be >= 1, got {stages}, {virtual}, "
                         f"{microbatches}")
    if virtual > 1 and microbatches % stages:
        raise ValueError(f"interleaved pipelining (virtual stages {virtual}) needs microbatches in whole groups of the "
                         f"{stages} stages: pipeline.microbatches={microbatches} is not a multiple of {stages}")


def _free(used: list[bool]) -> int:
    for i, u in enumerate(used):
        if not u:
            used[i] = True
            return i
    used.append(True)
    return len(used) - 1


def build(stages: int, virtual: int, microbatches: int, name: str = "1f1b") -> Schedule:
    """The static table of schedule `name` (see the module docstring)."""
    check(stages, virtual, microbatches, name)
    P, V, M = stages, virtual, microbatches
    C = P * V
    f_done: dict[tuple[int, int], int] = {}  # (m, c) -> tick its forward ran
    b_done: dict[tuple[int, int], int] = {}
    slot_of: dict[tuple[int, int], int] = {}  # arrived input of (m, c) -> slot on its stage
    gslot_of: dict[tuple[int, int], int] = {}
    used = [[] for _ in range(P)]
    gused = [[] for _ in range(P)]
    # Forward order per stage: Megatron's interleaved order (1f1b), or virtual stage by virtual stage (gpipe).
    order = [sorted(((m, v * P + s) for m in range(M) for v in range(V)),
                    key=(lambda u: (u[0] // P, u[1] // P, u[0] % P)) if name == "1f1b" else (lambda u: (u[1], u[0])))
             for s in range(P)]
    rows = []
    arriving: list[tuple[int, tuple[int, int], str]] = []  # (stage, unit, "x" | "g") sent at the previous tick
    total = M * C
    while len(b_done) < total:
        tick = len(rows)
        row = np.full((P, len(FIELDS)), -1, np.int32)
        for s, unit, what in arriving:  # receive what was sent last tick
            if what == "x":
                slot_of[unit] = row[s, COL["recv_slot"]] = _free(used[s])
            else:
                gslot_of[unit] = row[s, COL["recv_gslot"]] = _free(gused[s])
        sent = []
        all_forward_done = len(f_done) == total
        for s in range(P):
            # forward: the next unit in this stage's order, once its input is here
            pending = next((u for u in order[s] if u not in f_done), None)
            if pending is not None:
                m, c = pending
                if c == 0 or f_done.get((m, c - 1), tick) < tick:
                    row[s, COL["f_micro"]], row[s, COL["f_virtual"]] = m, c // P
                    row[s, COL["f_slot"]] = slot_of.get((m, c), -1)
                    f_done[(m, c)] = tick
                    if c + 1 < C:
                        sent.append(((c + 1) % P, (m, c + 1), "x"))
            # backward: the ready unit that ran its forward first (gpipe: only once every forward has run)
            if name == "gpipe" and not all_forward_done:
                continue
            ready = [u for u in f_done if u[1] % P == s and u not in b_done and f_done[u] <= tick
                     and (u[1] == C - 1 or (u[0], u[1] + 1) in b_done and b_done[(u[0], u[1] + 1)] < tick)]
            if ready:
                m, c = min(ready, key=lambda u: (f_done[u], u))
                row[s, COL["b_micro"]], row[s, COL["b_virtual"]] = m, c // P
                row[s, COL["b_slot"]] = slot_of.get((m, c), -1)
                row[s, COL["b_gslot"]] = gslot_of.get((m, c), -1)
                b_done[(m, c)] = tick
                if (m, c) in slot_of:
                    used[s][slot_of[(m, c)]] = False
                if (m, c) in gslot_of:
                    gused[s][gslot_of[(m, c)]] = False
                if c > 0:
                    sent.append(((c - 1) % P, (m, c - 1), "g"))
        rows.append(row)
        arriving = sent
        if tick > 4 * (total + C) + 8:
            raise AssertionError(f"pipeline schedule {name} did not finish (P={P}, V={V}, M={M})")
    table = np.stack(rows)
    return Schedule(name, P, V, M, table, slots=max(1, max(len(u) for u in used)),
                    gslots=max(1, max(len(u) for u in gused)))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How a train step is pipelined. `stages` is the mesh's `pipe` size; the rest are `config.pipeline`."""

    stages: int = 1
    virtual: int = 1  # chunks per stage (interleaving); 1: each stage holds one run of consecutive layers
    microbatches: int = 0  # per step (per gradient-accumulation micro-batch); 0: as many as stages
    schedule: str = DEFAULT_SCHEDULE  # SCHEDULES
    lighter_ends: int = 0  # layers fewer on the first and on the last stage

    @property
    def n_micro(self) -> int:
        return self.microbatches or self.stages

    def check(self, n_layers: int) -> None:
        """Raises a ValueError naming the setting when the schedule or the layer layout cannot be built."""
        check(self.stages, self.virtual, self.n_micro, self.schedule)
        layout(n_layers, self.stages, self.virtual, self.lighter_ends)


@functools.lru_cache(maxsize=32)
def cached(stages: int, virtual: int, microbatches: int, name: str) -> "Schedule":
    """`build`, once per setting (tables are immutable)."""
    return build(stages, virtual, microbatches, name)


def layout(n_layers: int, stages: int, virtual: int = 1, lighter_ends: int = 0) -> np.ndarray:
    """int [V, P, Lc]: the model layer in each slot of the pipeline layout, -1 for an empty slot."""
    chunks = stages * virtual
    if lighter_ends < 0:
        raise ValueError(f"pipeline.lighter_ends must be >= 0, got {lighter_ends}")
    per_chunk = -(-(n_layers + 2 * lighter_ends) // chunks)
    capacity = [per_chunk] * chunks
    capacity[0] -= lighter_ends
    capacity[-1] -= lighter_ends
    extra = sum(capacity) - n_layers  # empty slots beyond the lighter ends: taken from the chunks before the last
    order = list(range(chunks - 2, 0, -1)) or [chunks - 1]
    for i in range(extra * chunks + 1):
        if extra == 0:
            break
        c = order[i % len(order)]
        if capacity[c] > 0:
            capacity[c] -= 1
            extra -= 1
    if extra:
        raise ValueError(f"{n_layers} layers cannot fill {stages} pipeline stages x {virtual} virtual stages with "
                         f"lighter_ends={lighter_ends}")
    slots = np.full((chunks, per_chunk), -1, np.int64)
    layer = 0
    for c in range(chunks):
        start = lighter_ends if c == 0 else 0
        slots[c, start:start + capacity[c]] = np.arange(layer, layer + capacity[c])
        layer += capacity[c]
    return slots.reshape(virtual, stages, per_chunk)
