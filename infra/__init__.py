"""Deployment files (Prometheus rules, the Grafana dashboard); a package only so that they install with
deploykit (as deploykit.infra), for `deploykit deploy` to copy."""
