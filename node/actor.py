"""`Node` as a Ray actor: one per machine slot, named so any router can find it."""

from __future__ import annotations

import ray

from node.service import Node

NodeActor = ray.remote(Node)
