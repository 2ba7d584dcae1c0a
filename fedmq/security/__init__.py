"""Sealed client updates: HPKE to the coordinator's key (docs/security.md)."""
