"""Coordinator side: atlas directory, TUF repository, enrollment, merges, lineage, serving.

``Atlas`` is the entry point (``server/atlas.py``); ``make_server`` serves its
``repository/`` directory over HTTP.
"""

from fedarches.server.atlas import Atlas, MergeResult, Rejection, VerifiedBundle
from fedarches.server.http import AtlasHTTPServer, make_server
from fedarches.server.repository import ExpiryPolicy
from fedarches.format.version import AtlasVersion, Lineage, LineageEntry

__all__ = [
    "Atlas",
    "AtlasHTTPServer",
    "AtlasVersion",
    "ExpiryPolicy",
    "Lineage",
    "LineageEntry",
    "MergeResult",
    "Rejection",
    "VerifiedBundle",
    "make_server",
]
