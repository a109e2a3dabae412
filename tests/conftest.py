"""Shared fixtures: a namespace per test, users with tokens, real processes, a live bridge."""

import functools

import pytest
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, Permission, User
from django.db import connections
from rest_framework.authtoken.models import Token

from tests.support.broker import delete_namespace, delete_namespace_sync, new_namespace
from tests.support.clients import ApiUser
from tests.support.cluster import Cluster, test_database_url


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's test database, and psycopg's pool closed before it is dropped (the pool
    keeps a connection open, and PostgreSQL refuses to drop a database in use)."""
    yield
    with django_db_blocker.unblock():
        for connection in connections.all(initialized_only=True):
            if hasattr(connection, "close_pool"):
                connection.close_pool()


@pytest.fixture
def namespace(settings) -> str:
    """This test's own RT_NAMESPACE, so its broker objects never meet another test's."""
    name = new_namespace()
    settings.RT_NAMESPACE = name
    settings.RT_INSTANCE_ID = f"{name}-local"
    return name


PASSWORD = "pw-Test-Secret!"


@functools.cache
def _password_hash() -> str:
    """Hash the shared test password once: PBKDF2 per user would cost a second per test."""
    return make_password(PASSWORD)


def make_user(username: str, *, can_publish: bool = False, staff: bool = False, groups=()) -> ApiUser:
    password = PASSWORD
    user = User.objects.create(username=username, password=_password_hash(), is_staff=staff)
    if can_publish:
        user.user_permissions.add(Permission.objects.get(codename="add_message"))
    for group in groups:
        user.groups.add(group if isinstance(group, Group) else Group.objects.get_or_create(name=group)[0])
    token = Token.objects.create(user=user)
    return ApiUser(username=username, token=token.key, password=password)


@pytest.fixture
def users(transactional_db):
    """alice publishes; bob and carol only listen; staff sees everything."""
    return {
        "alice": make_user("alice", can_publish=True),
        "bob": make_user("bob"),
        "carol": make_user("carol"),
        "staff": make_user("staff", staff=True, can_publish=True),
    }


@pytest.fixture
def cluster(transactional_db, namespace):
    """Real Daphne and worker processes of this test; stopped and cleaned up afterwards."""
    deployment = Cluster(namespace=namespace, database_url=test_database_url())
    yield deployment
    deployment.stop()
    delete_namespace_sync(namespace, deployment.instance_ids())


@pytest.fixture
def publisher():
    """Install this process's publisher for a test (as the ASGI or WSGI module would); restored after."""
    from notifications import publishing

    before = publishing.install(None)
    yield lambda installed: publishing.install(lambda: installed)
    publishing.install(before)


@pytest.fixture
async def bridge(transactional_db, namespace, settings, publisher):
    """This process's bridge, connected, in the test's event loop (for WebsocketCommunicator),
    and installed as its publisher."""
    from consumers_app.bridge import ensure_bridge, reset_bridge

    await reset_bridge()
    live = ensure_bridge()
    publisher(live)
    assert await live.wait_ready(15), "bridge did not connect to RabbitMQ"
    yield live
    await reset_bridge()
    await delete_namespace(namespace, [settings.RT_INSTANCE_ID])


@pytest.fixture(scope="module")
def private_rabbit():
    """A RabbitMQ node of this module's own, so restarting it leaves the shared broker alone."""
    from tests.support.rabbit import PrivateRabbit

    rabbit = PrivateRabbit().start()
    yield rabbit
    rabbit.stop()


@pytest.fixture(autouse=True)
def _handler_registry_reset():
    from consumers_app.handlers import registry

    registry.reset()
    yield
    registry.reset()
