"""Failed sign-ins are throttled per username and per client address, in the database (so every
web instance shares the count), without touching API tokens and sockets."""

import datetime

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.test import RequestFactory

from realtime_project.signin import client_ip
from tests.conftest import PASSWORD, make_user

LOGIN = "/accounts/login/"
LIMIT = 10  # RT_LOGIN_FAILURE_LIMIT's default


def sign_in(client, username: str, password: str, ip: str = "10.0.0.1"):
    return client.post(LOGIN, {"username": username, "password": password}, REMOTE_ADDR=ip)


def signed_in(client) -> bool:
    return "_auth_user_id" in client.session


def assert_locked_out(response) -> None:
    assert response.status_code == 429, response.status_code
    page = response.content.decode()
    assert "Too many failed sign-ins" in page and "15 minutes" in page, page
    assert response["Retry-After"] == "900"


@pytest.fixture
def people(db):
    return {name: make_user(name) for name in ("alice", "bob", "mallory")}


def test_the_configuration_is_the_documented_one():
    assert settings.AXES_FAILURE_LIMIT == LIMIT
    assert settings.AXES_COOLOFF_TIME == datetime.timedelta(minutes=15)
    assert settings.AXES_LOCKOUT_PARAMETERS == ["username", "ip_address"]
    assert settings.AXES_HANDLER.endswith("SignInThrottle"), "state must be in the database, shared"


def test_after_ten_wrong_passwords_even_the_right_one_is_refused(client, people):
    for attempt in range(1, LIMIT):
        response = sign_in(client, "alice", "wrong")
        assert response.status_code == 200, attempt  # the form again, with its error
        assert "Please enter a correct username and password" in response.content.decode()
    assert_locked_out(sign_in(client, "alice", "wrong"))
    assert_locked_out(sign_in(client, "alice", PASSWORD))
    assert not signed_in(client)
    # From another address too: the username is locked, not only the address.
    assert_locked_out(sign_in(client, "alice", PASSWORD, ip="10.0.0.2"))
    # Another user from another address is not affected.
    response = sign_in(client, "bob", PASSWORD, ip="10.0.0.3")
    assert response.status_code == 302 and signed_in(client)


def test_the_lock_lifts_after_the_cool_off(client, people):
    for _ in range(LIMIT):
        sign_in(client, "alice", "wrong")
    assert_locked_out(sign_in(client, "alice", PASSWORD))
    # Tries during the lock did not extend it: moving the last failure 16 minutes back is enough.
    AccessAttempt.objects.update(
        attempt_time=datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=16)
    )
    assert sign_in(client, "alice", PASSWORD).status_code == 302 and signed_in(client)


def test_one_address_guessing_many_usernames_is_locked_out_and_other_addresses_are_not(client, people):
    for n in range(LIMIT):
        sign_in(client, f"nobody-{n}", "guess", ip="10.9.9.9")
    assert_locked_out(sign_in(client, "bob", PASSWORD, ip="10.9.9.9"))
    assert sign_in(client, "bob", PASSWORD, ip="10.0.0.4").status_code == 302


def test_a_success_resets_only_the_failures_of_that_username(client, people):
    """An attacker who signs into an account of their own must not wipe their failed guesses."""
    for _ in range(LIMIT - 1):
        sign_in(client, "bob", "guess", ip="10.6.6.6")
    assert sign_in(client, "mallory", PASSWORD, ip="10.6.6.6").status_code == 302
    client.logout()
    assert_locked_out(sign_in(client, "bob", "guess", ip="10.6.6.6"))
    # And the right owner's success resets their own count.
    for _ in range(LIMIT - 1):
        sign_in(client, "alice", "typo", ip="10.0.0.5")
    assert sign_in(client, "alice", PASSWORD, ip="10.0.0.5").status_code == 302
    assert not AccessAttempt.objects.filter(username="alice").exists()


def test_admin_sign_in_is_throttled_too(client, db):
    make_user("ops", staff=True)
    for _ in range(LIMIT):
        client.post("/admin/login/", {"username": "ops", "password": "wrong"}, REMOTE_ADDR="10.0.0.7")
    response = client.post("/admin/login/", {"username": "ops", "password": PASSWORD}, REMOTE_ADDR="10.0.0.7")
    assert response.status_code == 429 and not signed_in(client)


@pytest.fixture
def erin(transactional_db):
    """Committed (not in a test transaction), so the ASGI handler's threads see it."""
    return make_user("erin")


async def test_the_lockout_page_comes_through_the_asgi_stack_too(async_client, erin):
    """Daphne runs the middleware chain asynchronously: the same 429 page there."""
    for _ in range(LIMIT):
        await async_client.post(LOGIN, {"username": "erin", "password": "wrong"})
    response = await async_client.post(LOGIN, {"username": "erin", "password": PASSWORD})
    assert_locked_out(response)


def test_api_tokens_and_socket_tickets_still_work_for_a_locked_out_user(client, people):
    for _ in range(LIMIT):
        sign_in(client, "alice", "wrong")
    assert_locked_out(sign_in(client, "alice", PASSWORD))
    response = client.post(
        "/api/v1/ws-tickets/",
        headers={"Authorization": f"Token {people['alice'].token}"},
        REMOTE_ADDR="10.0.0.1",
    )
    assert response.status_code == 200 and response.json()["ticket"], response.content


@pytest.mark.parametrize(
    "trusted, forwarded, expected",
    [
        (0, "203.0.113.9", "127.0.0.1"),  # no proxy trusted: the header is the client's word
        (1, "203.0.113.9", "203.0.113.9"),  # nginx appended the address it saw
        (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # the client's own entry is ignored
        (2, "6.6.6.6, 203.0.113.9, 10.1.1.1", "203.0.113.9"),  # TLS terminator, then nginx
        (2, "203.0.113.9", "127.0.0.1"),  # did not come through both: the proxy's address
        (1, "not-an-address", "127.0.0.1"),
        (1, "", "127.0.0.1"),
    ],
)
def test_client_address_comes_from_trusted_proxies_only(settings, trusted, forwarded, expected):
    settings.RT_TRUSTED_PROXIES = trusted
    request = RequestFactory().post(LOGIN, REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR=forwarded)
    assert client_ip(request) == expected
