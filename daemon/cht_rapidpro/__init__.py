"""cht-rapidpro: an SMS gateway daemon between the Community Health Toolkit and RapidPro/TextIt."""

from __future__ import annotations

__version__ = "0.1.0"
