"""Flower's FedAvg, with the three things a reference build adds around it.

The averaging is Flower's own (``flwr.serverapp.strategy.FedAvg``, weighted by each
site's cell count, ``num-examples``); this subclass only decides WHICH replies it
averages and what happens after a round:

- a reply built on another round than the one asked for is stale and refused
  (the site reports the round in its metrics; a resumed run or a slow site must
  never mix weights of two rounds);
- a round with fewer than ``min_replies`` usable replies changes nothing (the
  weights stay those of the previous round) instead of averaging one site's drift;
- with trVAE's aggregate MMD (``exchange_embeddings``) each reply's per-study mean
  embeddings are taken out before Flower averages the weights, kept, and sent with the
  next round to every site (studies of fewer than ``k_min`` cells are refused);
- after every round the weights are checkpointed (``checkpoint``), so a killed run
  resumes from the last completed round; ``offset`` numbers the rounds of a resumed
  run after the ones already done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from fedarches.federation.reference_protocol import RFF_RECORD, record_bytes

STRATEGY_CLASSES = {"fedavg": FedAvg, "fedprox": FedProx}


@dataclass
class RoundLog:
    """What one round of the build received, as the run report records it."""

    round: int
    answered: list[int] = field(default_factory=list)  # node ids whose update was averaged
    stale: list[int] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    aggregated: bool = False
    bytes_down: int = 0  # shared weights sent to each site
    bytes_up: dict[int, int] = field(default_factory=dict)
    loss: float | None = None


def _metric(msg: Message, key: str) -> int:
    try:
        return int(next(iter(msg.content.metric_records.values()))[key])
    except (StopIteration, KeyError, TypeError, ValueError):
        return -1


def reply_round(msg: Message) -> int | None:
    """The round a reply says its update was built on (None: it does not say)."""
    r = _metric(msg, "round")
    return None if r < 0 else r


def make_strategy(name: str, **kw: Any) -> FedAvg:
    """The configured Flower strategy, subclassed once per class (FedAvg or FedProx)."""
    base = STRATEGY_CLASSES[name]
    cls = type(f"Reference{base.__name__}", (_ReferenceRounds, base), {})
    return cls(**kw)


class _ReferenceRounds:
    """Mixed in before a Flower strategy: stale refusal, minimum replies, checkpoints."""

    def __init__(self, *, offset: int = 0, min_replies: int = 1,
                 checkpoint: Callable[[int, ArrayRecord], None] | None = None,
                 exchange_embeddings: bool = False, k_min: int = 1, **kw: Any) -> None:
        kw.setdefault("fraction_evaluate", 0.0)
        kw.setdefault("min_evaluate_nodes", 0)
        super().__init__(**kw)  # type: ignore[call-arg]
        self.offset = int(offset)
        self.min_replies = int(min_replies)
        self.checkpoint = checkpoint
        self.rounds: list[RoundLog] = []
        self.exchange_embeddings = bool(exchange_embeddings)
        self.k_min = int(k_min)
        # study -> mean embedding of the latest round that sent one (checkpointed with the
        # weights, so a resumed run sends the same ones)
        self.embeddings: dict[str, Array] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.offset
        log_entry = RoundLog(round=rnd, bytes_down=record_bytes(arrays))
        self.rounds.append(log_entry)
        messages = list(super().configure_train(rnd, arrays, config, grid))  # type: ignore[misc]
        if self.exchange_embeddings and self.embeddings:
            record = ArrayRecord(dict(sorted(self.embeddings.items())))
            log_entry.bytes_down += record_bytes(record)
            for msg in messages:
                msg.content[RFF_RECORD] = record
        return messages

    def _take_embeddings(self, msg: Message) -> dict[str, Array]:
        """A reply's study embeddings (``<study>`` -> mean, ``<study>/n`` -> cells), removed
        from the reply: Flower's averaging expects exactly one ArrayRecord."""
        if RFF_RECORD not in msg.content.array_records:
            return {}
        record = msg.content.array_records[RFF_RECORD]
        del msg.content[RFF_RECORD]
        out: dict[str, Array] = {}
        for key, value in record.items():
            if key.endswith("/n"):
                continue
            n = record.get(f"{key}/n")
            if n is not None and int(n.numpy().reshape(-1)[0]) >= self.k_min:
                out[key] = value
        return out

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.offset
        if not self.rounds or self.rounds[-1].round != rnd:
            self.rounds.append(RoundLog(round=rnd))
        entry = self.rounds[-1]
        fresh: list[Message] = []
        embeddings: dict[str, Array] = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            taken = {} if msg.has_error() else self._take_embeddings(msg)
            if msg.has_error():
                entry.failed.append({"node": node, "reason": (msg.error.reason or "").strip()[:300]})
            elif reply_round(msg) != rnd:
                entry.stale.append(node)
                log(WARNING, "fedarches: round %d: refused a stale update from node %d (built on round %s)",
                    rnd, node, reply_round(msg))
            else:
                fresh.append(msg)
                entry.answered.append(node)
                entry.bytes_up[node] = sum(record_bytes(r) for r in msg.content.array_records.values())
                embeddings |= taken
                if taken:
                    entry.bytes_up[node] += record_bytes(ArrayRecord(taken))
        if len(fresh) < self.min_replies:
            log(WARNING, "fedarches: round %d: %d usable update(s), fewer than the minimum %d; "
                "the weights stay those of the previous round", rnd, len(fresh), self.min_replies)
            return None, None
        # in the sites' order, not arrival order: float sums depend on their order, and the same
        # build must give the same weights however the replies arrived (and when resumed)
        fresh.sort(key=lambda m: (_metric(m, "site-index"), int(m.metadata.src_node_id)))
        arrays, metrics = super().aggregate_train(rnd, fresh)  # type: ignore[misc]
        entry.aggregated = arrays is not None
        if entry.aggregated:
            self.embeddings |= embeddings
        if metrics is not None and "loss" in metrics:
            entry.loss = float(metrics["loss"])
        return arrays, metrics

    def evaluate_centralized(self, server_round: int, arrays: ArrayRecord) -> None:
        """``Strategy.start``'s ``evaluate_fn``: after each completed round, the checkpoint."""
        if server_round > 0 and self.checkpoint is not None:
            self.checkpoint(server_round + self.offset, arrays)
            log(INFO, "fedarches: round %d checkpointed", server_round + self.offset)
        return None


__all__ = ["RoundLog", "make_strategy", "reply_round", "STRATEGY_CLASSES"]
