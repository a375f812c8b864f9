"""Subscriptions and delivery of `HardenedBroker` (part of `iotbiz.broker.hardened`).

`SubscriptionDelivery` is amqtt's `Broker` with its subscription table, broadcast loop and
retained-message delivery replaced; `HardenedBroker` inherits it and sets its attributes (the
indexes, the broadcast queue, the drop counters, `max_queued_messages`) in `__init__`. Fits
amqtt==0.12.1, which `iotbiz.broker.hardened` checks on import.

Cost at fleet scale: amqtt walked every subscription of every client for each PUBLISH, all
subscriptions for each CONNECT and all retained messages for each SUBSCRIBE. Subscriptions now
live in a `SubscriptionIndex` (exact filters by one dict lookup, wildcard filters in a trie, by
client id too) and retained messages in a `RetainedIndex` (`iotbiz.broker.topic_index`). The
index is the one seam: `add_subscription`, `_del_subscription`, `_del_all_subscriptions`,
`_subscriptions_of`, `_run_broadcast` and `_publish_retained_messages_for_subscription` use it,
and amqtt's `_subscriptions` dict stays empty (`subscriptions` returns a snapshot in its shape).
A message matching several of one client's filters reaches it once, at the highest of their
QoS [MQTT-3.3.5-1] (amqtt sent one copy per filter). amqtt's session monitor walked every
A message matching several of one client's filters reaches it once, at the highest of their
QoS [MQTT-3.3.5-1] (amqtt sent one copy per filter).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.session import Session

from iotbiz.broker.handler import log_task_failure
from iotbiz.broker.log_filters import Throttle
from iotbiz.broker.topic_index import RetainedIndex, SubscriptionIndex, is_valid_filter

__all__ = [
    "BROADCAST_SHUTDOWN_TIMEOUT",
    "DROP_LOG_PERIOD_S",
    "SUBACK_FAILURE",
    "SubscriptionDelivery",
]

log = logging.getLogger("iotbiz.broker.hardened")  # the logger name from before the split

# The QoS of the PUBLISH being handled, for the broadcast it causes (set per client task).
_PUBLISHED_QOS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "published_qos", default=None
)

SUBACK_FAILURE = 0x80  # SUBACK return code of a refused subscription
DROP_LOG_PERIOD_S = 10.0  # dropped messages are logged at most this often (and always counted)
BROADCAST_SHUTDOWN_TIMEOUT = 5.0  # amqtt's: deliveries still running at shutdown get this long


class SubscriptionDelivery(Broker):
    """amqtt's `Broker` with subscriptions in a `SubscriptionIndex`, retained messages in a
    `RetainedIndex`, and bounded, ACL-checked delivery (see the module docstring)."""

    # Set by HardenedBroker.__init__.
    max_queued_messages: int
    dropped_queued_messages: int
    dropped_deliveries: int
    _broadcast_queue: asyncio.Queue[dict[str, Any]]
    _queue_drops_logged: Throttle
    _delivery_drops_logged: Throttle
    _background: set[asyncio.Task[Any]]
    _index: SubscriptionIndex[Session]
    _retained: RetainedIndex[Any]

    async def drop_retained(
        self, matches: Callable[[str], bool], *, topic_filter: str | None = None
    ) -> int:
        """Remove the retained messages whose topic `matches`; return how many.

        With `topic_filter`, only the messages that filter selects are considered (found in
        the retained index, not by a walk over all of them). Each goes through amqtt's own
        clearing path (`retain_message` with an empty payload, [MQTT-3.3.1-10]), which also
        fires the RETAINED_MESSAGE event.
        """
        candidates = (
            list(self._retained_messages)
            if topic_filter is None
            else [topic for topic, _ in self._retained.matching(topic_filter)]
        )
        doomed = [topic for topic in candidates if matches(topic)]
        for topic in doomed:
            await self.retain_message(None, topic, b"")
        return len(doomed)

    def _subscriptions_of(self, session: Session) -> list[tuple[str, int]]:
        """The client's own subscriptions, from the index (no walk over everyone's)."""
        return self._index.filters_of(session.client_id)

    # -- subscriptions (the index is the seam: iotbiz.broker.topic_index) ---------------------

    @property
    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]:
        """amqtt's `{filter: [(session, qos), ...]}`, as a snapshot of the index (amqtt's
        property returned its live dict, which the broker no longer fills)."""
        return self._index.as_dict()

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's `Broker.add_subscription`, storing into the `SubscriptionIndex`.

        Same checks in the same order (filter syntax, SUBSCRIBE ACL, `max-qos`), and also an
        empty filter refused [MQTT-4.7.3-1] (amqtt accepted it). A second SUBSCRIBE to the same
        filter replaces the QoS [MQTT-3.8.4-3] (amqtt kept the first one).
        """
        topic_filter, qos = subscription
        if not is_valid_filter(topic_filter):
            return SUBACK_FAILURE
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return SUBACK_FAILURE
        max_qos = self.config.get("max-qos", qos)
        if not isinstance(max_qos, int):
            max_qos = qos
        qos = min(qos, max_qos)
        self._index.add(session.client_id, session, topic_filter, qos)
        return qos

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        """amqtt's (UNSUBSCRIBE one filter), in the index: only this client's entry."""
        return 1 if self._index.remove(session.client_id, a_filter) else 0

    async def _del_all_subscriptions(self, session: Session) -> None:
        """amqtt's (a session deleted or cleaned up) walked every filter; now only the
        client's own entries are touched."""
        self._index.remove_client(session.client_id)

    # -- delivery ----------------------------------------------------------------------------

    async def _may_receive(self, session: Session, topic: str) -> bool:
        allowed: bool = await self._topic_filtering(session, topic=topic, action=Action.RECEIVE)
        if not allowed:
            log.info("%s may not receive %r; not delivered", session.client_id, topic)
        return allowed

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver the messages queued while the session was offline.

        Copy of amqtt's method, changed: each message passes the RECEIVE ACL again (it may have
        changed since), goes out with RETAIN=0 [MQTT-3.3.1-9] (amqtt set 1), and its ack is not
        awaited here (that blocked the client's message loop).
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if await self._may_receive(session, queued.topic):
                self._deliver(handler, session, queued.topic, queued.data, queued.qos)

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """amqtt's, with the published message's QoS passed on to its broadcast."""
        message = wait_deliver.result()
        token = _PUBLISHED_QOS.set(getattr(message, "qos", None))
        try:
            handled: bool = await super()._handle_message_delivery(
                client_session, handler, wait_deliver
            )
            return handled
        finally:
            _PUBLISHED_QOS.reset(token)

    async def _broadcast_message(
        self, session: Any, topic: str | None, data: Any, force_qos: int | None = None
    ) -> None:
        """Every message allowed through the ACL (and every will) passes here; `force_qos` is
        the message's QoS (amqtt passed it for wills only)."""
        if force_qos is None:
            force_qos = _PUBLISHED_QOS.get()
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _broadcast_loop(self) -> None:
        """Broadcast queued messages until the broker shuts down.

        Replaces amqtt's loop, which wrapped every message in a task of its own and raced it
        against the shutdown future with `asyncio.wait`: here each message is broadcast inline,
        and shutting down (amqtt resolves `_broadcast_shutdown_waiter`) cancels this task.
        Tasks left in `running` are reaped in order, failures logged, as amqtt did; deliveries
        are not among them any more (see `_deliver`).
        """
        running = self._tasks_queue
        shutdown = self._broadcast_shutdown_waiter
        this = asyncio.current_task()
        if this is not None:
            shutdown.add_done_callback(lambda _: this.cancel())
        try:
            while True:
                while running and running[0].done():
                    log_task_failure(running.popleft())
                await self._run_broadcast(running)
        except asyncio.CancelledError:
            if not shutdown.done():
                raise  # cancelled by someone else: not a shutdown
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=BROADCAST_SHUTDOWN_TIMEOUT)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """Deliver one message to the sessions subscribed to it.

        Replaces amqtt's method, changed: a message goes out at the lower of its own QoS and
        the subscription's [MQTT-3.8.4-6] (amqtt used the subscription's, so a QoS 0 message
        reached a QoS 2 subscriber at QoS 2 and was queued for offline sessions, and a QoS 2
        will reached a QoS 0 subscriber at QoS 2); each delivery is started by `_deliver`
        (bounded per client, not kept in `running_tasks`); and no log text is built per
        subscription (amqtt formatted several f-strings for every filter of every session,
        matching or not, for every message, whatever the log level). The subscribers come
        from the `SubscriptionIndex` (amqtt compared the topic with every filter of every
        client), each once at the highest QoS of its matching filters [MQTT-3.3.5-1]; they are
        collected before anything is awaited, so subscriptions changing meanwhile cannot break
        the iteration.
        """
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        message_qos: int | None = broadcast.get("qos")
        for target, sub_qos in self._index.match(topic):
            qos = sub_qos if message_qos is None else min(message_qos, sub_qos)
            if not await self._may_receive(target, topic):
                continue
            if target.transitions.state != "connected":
                # Kept for a persistent session at QoS 1 and 2 [MQTT-3.1.2-5] (amqtt's rule:
                # not for anonymous clients).
                if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, target)
                continue
            handler = self._get_handler(target)
            if handler is not None:
                self._deliver(handler, target, topic, broadcast["data"], qos)

    def _deliver(
        self,
        handler: Any,
        target: Session,
        topic: str,
        data: Any,
        qos: int,
        *,
        retain: bool = False,
    ) -> None:
        """Start one delivery, owned by the client's handler (and cancelled at shutdown), or
        count it as dropped when the client already has `max_queued_messages` unfinished.

        Broadcasts, retained messages on SUBSCRIBE and queued messages on reconnect all come
        this way. amqtt kept every broadcast delivery task in `running_tasks`, reaped only from
        its head (one subscriber that stopped reading held back the reaping of every later
        delivery), and spawned one per retained message per SUBSCRIBE without limit.
        """
        delivery = handler.deliver(topic, data, qos, retain=retain)
        if delivery is None:
            self.dropped_deliveries += 1
            if self._delivery_drops_logged.ready():
                log.warning(
                    "client %s is %d deliveries behind: message on %r dropped "
                    "(%d dropped in all; logged at most every %.0f s)",
                    target.client_id,
                    self.max_queued_messages,
                    topic,
                    self.dropped_deliveries,
                    DROP_LOG_PERIOD_S,
                )
            return
        self._background.add(delivery)
        delivery.add_done_callback(self._background.discard)
        delivery.add_done_callback(log_task_failure)

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        """amqtt's method (queue a message for an offline persistent session), with a cap.

        amqtt queued without limit for as long as the session lived (7 days by default): a
        device that stays away while commands keep coming held them all in memory. Now at most
        `max_queued_messages` wait; when full, the oldest is dropped and counted (the newest
        commands matter most to a device coming back), and the drops are logged at most every
        `DROP_LOG_PERIOD_S`.
        """
        queue = target_session.retained_messages
        while queue.qsize() >= self.max_queued_messages:
            queue.get_nowait()
            self.dropped_queued_messages += 1
            if self._queue_drops_logged.ready():
                log.warning(
                    "queue of offline client %s full (%d): dropped its oldest message "
                    "(%d dropped in all; logged at most every %.0f s)",
                    target_session.client_id,
                    self.max_queued_messages,
                    self.dropped_queued_messages,
                    DROP_LOG_PERIOD_S,
                )
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Send the retained messages matching a subscription (defects 2 and 3).

        Copy of amqtt's method, changed: each message passes the RECEIVE ACL; QoS is
        min(subscription, message) (amqtt sent QoS-0 messages at the subscription's QoS); acks
        are not awaited here; the messages come from the `RetainedIndex` (amqtt matched the
        filter against every retained message: one lookup now for a filter without wildcards).
        """
        topic_filter, sub_qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in self._retained.matching(topic_filter):
            if not await self._may_receive(session, topic):
                continue
            qos = sub_qos if retained.qos is None else min(sub_qos, retained.qos)
            self._deliver(handler, session, retained.topic, retained.data, qos, retain=True)
