"""Coordinator side: atlas directory, TUF repository, enrollment, merges, lineage, serving.

``Atlas`` is the entry point (``server/atlas.py``, a facade over
``registry``, ``intake``, ``merge``, ``publish`` and ``reference``);
``serve_atlas`` serves its ``repository/`` directory over HTTP and keeps the
metadata re-signed.
"""

from fedarches.format.version import AtlasVersion, Lineage, LineageEntry
from fedarches.server.atlas import Atlas
from fedarches.server.http import AtlasHTTPServer, make_server, serve_atlas
from fedarches.server.intake import VerifiedBundle
from fedarches.server.merge import BundleOutcome, MergeResult, Rejection
from fedarches.server.reference import ReferenceBuild
from fedarches.server.repository import ExpiryPolicy

__all__ = [
    "Atlas",
    "AtlasHTTPServer",
    "AtlasVersion",
    "BundleOutcome",
    "ExpiryPolicy",
    "Lineage",
    "LineageEntry",
    "MergeResult",
    "ReferenceBuild",
    "Rejection",
    "VerifiedBundle",
    "make_server",
    "serve_atlas",
]
