"""Deployment: the parity-gated export, the recognizer over an export, the service."""
