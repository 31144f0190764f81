"""
Kubeconfig files and client configurations that point at an emulated API server.

The emulated server speaks plain HTTP on loopback and needs no credentials,
so the kubeconfig has an empty user and no certificate authority.
"""
from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import kubernetes.client

CONTEXT_NAME = 'ebbtide-testbed'


def render_kubeconfig(server_url: str, *, namespace: str = 'default', name: str = CONTEXT_NAME) -> str:
    config = {
        'apiVersion': 'v1',
        'kind': 'Config',
        'preferences': {},
        'clusters': [{'name': name, 'cluster': {'server': server_url}}],
        'users': [{'name': name, 'user': {}}],
        'contexts': [{'name': name, 'context': {'cluster': name, 'user': name, 'namespace': namespace}}],
        'current-context': name,
    }
    return yaml.safe_dump(config, sort_keys=False)


def write_kubeconfig(
        path: str | pathlib.Path,
        server_url: str,
        *,
        namespace: str = 'default',
        name: str = CONTEXT_NAME,
) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_kubeconfig(server_url, namespace=namespace, name=name), encoding='utf-8')
    return path


def client_configuration(server_url: str) -> kubernetes.client.Configuration:
    """A configuration for the official client, without touching its process-wide default."""
    import kubernetes.client  # lazily: the standalone server does not need the client

    configuration = kubernetes.client.Configuration()
    configuration.host = server_url
    configuration.verify_ssl = False
    return configuration
