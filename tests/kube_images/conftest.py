"""The ``kube_images`` marker: ``pytest -m kube_images`` selects the tests of kube/images."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kube_images: the cluster's images (kube/images): build, import, run, manifests"
    )
