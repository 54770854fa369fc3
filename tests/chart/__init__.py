"""Helm chart, container image and GitOps tests (issue 6)."""
