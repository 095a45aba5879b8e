"""Flower layer: the coordinator's ServerApp (``server_app``), the site's ClientApp
(``client_app``), the records they exchange (``protocol``), the Flower app
configuration (``app_dir``), TLS certificates and SuperNode keys (``certs``), and
the validated run config (``run_config``) and the rounds (``coordinator``).
Starting a local SuperLink and SuperNodes for tests and the demo is
``fedarches.testing.flower``."""
