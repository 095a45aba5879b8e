"""Flower layer: the coordinator's ServerApp (``server_app``), the site's ClientApp
(``client_app``), the records they exchange (``protocol``), the Flower app
configuration (``app_dir``), TLS certificates and SuperNode keys (``certs``), and
starting/stopping a local SuperLink and SuperNodes (``local``)."""
