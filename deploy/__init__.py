"""Deployment files. ``serve_config.yaml`` also ships inside the installed package
(``deepserve.deploy``), so that ``deepserve serve`` finds its default config without a
checkout; the rest (Kubernetes, Prometheus, Grafana) is used from the repository."""
