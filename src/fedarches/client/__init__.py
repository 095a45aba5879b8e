"""Site side: verified fetch over TUF (``client/fetch.py``), the contribution plan
(``client/plan.py``), mapping and signed bundles (``client/site.py``)."""

from fedarches.client.fetch import AtlasClient, FetchedVersion
from fedarches.client.plan import ContributionPlan, plan_contribution
from fedarches.client.site import (
    STATUS_CONTRIBUTED,
    STATUS_NOTHING_NEW,
    SiteMapResult,
    map_and_contribute,
    map_local,
)

__all__ = [
    "STATUS_CONTRIBUTED",
    "STATUS_NOTHING_NEW",
    "AtlasClient",
    "ContributionPlan",
    "FetchedVersion",
    "SiteMapResult",
    "map_and_contribute",
    "map_local",
    "plan_contribution",
]
