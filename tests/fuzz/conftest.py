"""The fuzz suite: property-based tests (Hypothesis) of the spec -> trainer config -> Job path and
of the trainer's dataset validator. The profile (fixed, bounded) is in :mod:`budget`."""

from __future__ import annotations

from .budget import register

register()
