"""
Pytest fixtures of the test bed; ``tests/conftest.py`` imports them.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.testbed.apiserver import ApiServerThread


@pytest.fixture()
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServerThread]:
    """
    A fresh emulated Kubernetes API on a free loopback port, served from a background thread.

    Yields an `ApiServerThread`: ``.url``, ``.kubeconfig_path``, ``.env`` (``KUBECONFIG``),
    ``.server`` (the `EmulatedApiServer`: ``register_crd``, ``get_object``, ``list_objects``...),
    and ``.api_client()`` for the official client. Fails the test if the emulator answered
    any request with HTTP 500 (an emulator bug or a broken injected reaction).
    """
    kubeconfig_path = tmp_path_factory.mktemp('apiserver') / 'kubeconfig'
    with ApiServerThread(kubeconfig_path=kubeconfig_path) as handle:
        yield handle
    if handle.server.unexpected_errors:
        errors = '\n'.join(repr(e) for e in handle.server.unexpected_errors)
        pytest.fail(f'The emulated API server failed on some requests:\n{errors}')
