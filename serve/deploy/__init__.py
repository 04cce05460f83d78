"""Deployments beyond one `deploykit serve` process: project files for the engines operators already run
(Docker compose now), rendered from the same launch plans `serve` makes."""
