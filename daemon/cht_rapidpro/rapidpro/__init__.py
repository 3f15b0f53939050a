"""RapidPro/TextIt API v2 access: the client, its throttle budget and wire models."""
