"""Site side: verified fetch over TUF (``client/fetch.py``), mapping and signed bundles
(``client/site.py``)."""

from fedarches.client.fetch import AtlasClient, FetchedVersion, fetch_version
from fedarches.client.site import SiteMapResult, map_and_contribute, map_local

__all__ = ["AtlasClient", "FetchedVersion", "SiteMapResult", "fetch_version", "map_and_contribute", "map_local"]
