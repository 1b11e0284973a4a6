"""Backends: thin wrappers that run one bundle component each and check its inputs."""
