"""Skip markers for tests that need software this machine may lack."""

import shutil

import pytest

needs_rabbitmq_server = pytest.mark.skipif(
    shutil.which("rabbitmq-server") is None, reason="rabbitmq-server is not installed here"
)
