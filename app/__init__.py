"""Keyplane: API-key management service."""
