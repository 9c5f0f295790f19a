"""Prefect flows that drive the DVC DAG (they never import torch)."""

import os

# The project's own Prefect runs send no analytics: on a machine without internet every run would log
# "Failed to send telemetry". Set before prefect is imported; an explicit setting still wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
