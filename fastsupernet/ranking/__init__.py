"""Ranking candidate sub-networks of a trained supernet: engines, protocol and the driver.

``rank(checkpoint, archs, out, ...)`` scores every candidate with BN recalibration and writes a
submission (README, "Ranking"); the engines that do the arithmetic live in
:mod:`fastsupernet.ranking.engines`, the resumable journal in :mod:`fastsupernet.journal` and the
``torchrun`` sharding in :mod:`.shard`.
"""
from .engines import ENGINES, PRECISIONS, CandidateScore, Engine, Protocol, RankData, make_engine, prefix_sharing, prepare_data
from .driver import RankError, RankResult, existing_journals, journal_path, network_key, rank
from ..journal import JournalError

__all__ = [
    "rank",
    "RankResult",
    "RankError",
    "JournalError",
    "network_key",
    "journal_path",
    "existing_journals",
    "Protocol",
    "RankData",
    "CandidateScore",
    "Engine",
    "make_engine",
    "prepare_data",
    "prefix_sharing",
    "ENGINES",
    "PRECISIONS",
]
