"""An external broker's auth callbacks, decided by the same `Authority` as the embedded broker.

RabbitMQ 3.x `rabbitmq_auth_backend_http` (form-encoded POSTs, answers `allow [tags]` / `deny`
as text) at `/api/v1/broker-auth/rabbitmq/{user,vhost,resource,topic}`:
  - user: `username`, `password`, `client_id` -> `Authority.authenticate` (the same bcrypt share,
    credential cache and refusal counting as the embedded broker's CONNECT); `allow` or
    `allow administrator` for a superuser account;
  - vhost: any vhost for a user `Authority.principal_of` knows (see below);
  - resource: what RabbitMQ's MQTT plugin needs for that user's session: read and write on the
    `amq.topic` exchange, and configure/read/write on the session's own queues
    `mqtt-subscription-{client_id}qos{0,1}` (a client id the user may use); nothing else;
  - topic: `routing_key` is the MQTT topic with `/` as `.` and `+` as `*`; mapped back and asked
    of `may_publish` (write) or `may_subscribe` (read). RabbitMQ 3.10 turns every `/` into `.` and
    leaves a `.` as it is, so a topic holding a `.` cannot be told apart from one with a `/`
    there; device ids never hold a `.` (iotbiz.names), so no device topic does, and a routing
    key with one too many words maps back to no topic anyone may use: denied.
EMQX 5 HTTP authentication at `/api/v1/broker-auth/emqx/authn` and authorization at `/authz`
(JSON bodies of strings, configured in EMQX as {"username": "${username}", "password":
"${password}", "clientid": "${clientid}"} and {"username": "${username}", "clientid":
"${clientid}", "topic": "${topic}", "action": "${action}"}; answers {"result": "allow" | "deny"},
authn with "is_superuser"). EMQX can send a header, so the secret goes as a Bearer token.

Only verified users get past `user` (or `authn`). The other callbacks carry no password; they
answer for the names `Authority.principal_of` knows: verified by this process, or, when the login
went to another platform process behind the same load balancer, an ACTIVE device or an account in
the store. A revoke makes every process forget the name, so it denies the next check at once.

The callbacks answer only the broker: the request's address must be in
`broker_auth.allowed_addresses` (loopback by default) and, when `broker_auth.secret` is set, carry
it (`?secret=` in the callback URLs RabbitMQ is given, or an `Authorization: Bearer` header).
Anyone else gets 403 {"error": ...}; a body without the fields a callback needs gets 400.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from iotbiz.broker.authority import (
    Authority,
    Principal,
    Refusal,
    Role,
    client_id_allowed,
)
from iotbiz.errors import BadRequest, Forbidden
from iotbiz.registrar.keys import REFUSALS
from iotbiz.registrar.releases_api import AUTHORITY
from iotbiz.settings import BrokerAuthSettings

log = logging.getLogger(__name__)

PREFIX = "/api/v1/broker-auth"
MAX_BODY_BYTES = 4096
EXCHANGE = "amq.topic"  # where RabbitMQ's MQTT plugin publishes
QUEUE_PREFIX = "mqtt-subscription-"
QUEUE_SUFFIXES = ("qos0", "qos1")

BROKER_AUTH = web.AppKey("broker_auth", BrokerAuthSettings)
Handler = Callable[[web.Request], Awaitable[web.Response]]


def add_routes(app: web.Application, authority: Authority, settings: BrokerAuthSettings) -> None:
    """Mount the callbacks (the app serves them only with an `authority`)."""
    app[BROKER_AUTH] = settings
    app[AUTHORITY] = authority
    rabbit = f"{PREFIX}/rabbitmq"
    app.router.add_post(f"{rabbit}/user", rabbitmq_user)
    app.router.add_post(f"{rabbit}/vhost", rabbitmq_vhost)
    app.router.add_post(f"{rabbit}/resource", rabbitmq_resource)
    app.router.add_post(f"{rabbit}/topic", rabbitmq_topic)
    app.router.add_post(f"{PREFIX}/emqx/authn", emqx_authn)
    app.router.add_post(f"{PREFIX}/emqx/authz", emqx_authz)


def _allow() -> web.Response:
    return web.Response(text="allow")


def _deny() -> web.Response:
    return web.Response(text="deny")


def _check_sender(request: web.Request) -> None:
    settings = request.app[BROKER_AUTH]
    allowed = {a.strip() for a in settings.allowed_addresses.split(",") if a.strip()}
    if request.remote not in allowed:
        raise Forbidden("broker callbacks answer only the broker's address")
    if settings.secret and not _has_secret(request, settings.secret):
        raise Forbidden("broker callbacks need the broker's secret")


async def _form(request: web.Request, *required: str) -> Mapping[str, str]:
    """The broker's form, after checking who sent it; 400 without a required field."""
    _check_sender(request)
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("expected a form-encoded body")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadRequest(f"body over {MAX_BODY_BYTES} bytes")
    form = await request.post()
    return _required({k: v for k, v in form.items() if isinstance(v, str)}, required)


def _required(fields: Mapping[str, str], required: tuple[str, ...]) -> Mapping[str, str]:
    missing = [name for name in required if name not in fields]
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")
    return fields


async def _json(request: web.Request, *required: str) -> Mapping[str, str]:
    """EMQX's JSON object of strings, after checking who sent it."""
    _check_sender(request)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadRequest(f"body over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("expected a JSON object of strings") from None
    if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
        raise BadRequest("expected a JSON object of strings")
    return _required(body, required)


def _has_secret(request: web.Request, secret: str) -> bool:
    sent = request.query.get("secret", "")
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        sent = header.removeprefix("Bearer ")
    return hmac.compare_digest(sent.encode(), secret.encode())


async def rabbitmq_user(request: web.Request) -> web.Response:
    form = await _form(request, "username", "password")
    authority = request.app[AUTHORITY]
    username, client_id = form["username"], form.get("client_id") or form["username"]
    result = await authority.authenticate(username, form["password"], client_id)
    if isinstance(result, Refusal):
        request.app[REFUSALS].note("mqtt_login", username, None, result.value)
        return _deny()
    return web.Response(text="allow administrator" if result.role is Role.SUPERUSER else "allow")


async def rabbitmq_vhost(request: web.Request) -> web.Response:
    form = await _form(request, "username", "vhost")
    principal = await request.app[AUTHORITY].principal_of(form["username"])
    return _allow() if principal is not None else _deny()


async def rabbitmq_resource(request: web.Request) -> web.Response:
    form = await _form(request, "username", "resource", "name", "permission")
    principal = await request.app[AUTHORITY].principal_of(form["username"])
    if principal is None:
        return _deny()
    if principal.role is Role.SUPERUSER:
        return _allow()
    resource, name, permission = form["resource"], form["name"], form["permission"]
    if resource == "exchange":
        allowed = name == EXCHANGE and permission in ("read", "write")
    elif resource == "queue":
        allowed = _own_queue(principal, name, form.get("client_id"))
    else:
        allowed = False
    return _allow() if allowed else _deny()


def _own_queue(principal: Principal, name: str, client_id: str | None) -> bool:
    """A queue of the MQTT plugin for a session this principal may hold."""
    if not name.startswith(QUEUE_PREFIX) or not name.endswith(QUEUE_SUFFIXES):
        return False
    queue_client = name[len(QUEUE_PREFIX) : -len(QUEUE_SUFFIXES[0])]
    if client_id is not None and queue_client != client_id:
        return False
    if principal.role is Role.DEVICE:
        return queue_client == principal.username
    return bool(queue_client) and "/" not in queue_client


async def rabbitmq_topic(request: web.Request) -> web.Response:
    form = await _form(request, "username", "name", "permission", "routing_key")
    authority = request.app[AUTHORITY]
    principal = await authority.principal_of(form["username"])
    if principal is None or form["name"] != EXCHANGE:
        return _deny()
    topic = routing_key_to_topic(form["routing_key"])
    if topic is None:
        return _deny()
    if form["permission"] == "write":
        allowed = authority.may_publish(principal, topic)
    elif form["permission"] == "read":
        allowed = authority.may_subscribe(principal, topic)
    else:
        allowed = False
    return _allow() if allowed else _deny()


def routing_key_to_topic(routing_key: str) -> str | None:
    """The MQTT topic (or filter) behind a RabbitMQ routing key, or None when it has no
    IoTBiz meaning (empty, or a '/' that RabbitMQ 3.10 would never send)."""
    if not routing_key or "/" in routing_key:
        return None
    return "/".join("+" if word == "*" else word for word in routing_key.split("."))


# -- EMQX 5 ------------------------------------------------------------------------------------


def _emqx(result: bool, **extra: bool) -> web.Response:
    return web.json_response({"result": "allow" if result else "deny", **extra})


async def emqx_authn(request: web.Request) -> web.Response:
    """EMQX's HTTP authentication: {"username", "password", "clientid"} ->
    {"result": "allow" | "deny", "is_superuser": ...}."""
    body = await _json(request, "username", "password", "clientid")
    result = await request.app[AUTHORITY].authenticate(
        body["username"], body["password"], body["clientid"]
    )
    if isinstance(result, Refusal):
        request.app[REFUSALS].note("mqtt_login", body["username"], None, result.value)
        return _emqx(False, is_superuser=False)
    return _emqx(True, is_superuser=result.role is Role.SUPERUSER)


async def emqx_authz(request: web.Request) -> web.Response:
    """EMQX's HTTP authorization: {"username", "clientid", "topic", "action": "publish" |
    "subscribe"} -> {"result": "allow" | "deny"}, for a name `Authority` verified."""
    body = await _json(request, "username", "clientid", "topic", "action")
    authority = request.app[AUTHORITY]
    principal = await authority.principal_of(body["username"])
    if principal is None or not client_id_allowed(principal, body["clientid"]):
        return _emqx(False)
    if body["action"] == "publish":
        return _emqx(authority.may_publish(principal, body["topic"]))
    if body["action"] == "subscribe":
        return _emqx(authority.may_subscribe(principal, body["topic"]))
    return _emqx(False)
