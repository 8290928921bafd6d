"""The job queue's contract, held by both brokers the Celery app is made for: the in-memory
transport (the embedded default) and Redis (workers on a broker). Read at the transport, as a
worker's consumer sees it: a task sent is delivered once, an unacknowledged one comes back
when its consumer goes away, and queues keep their tasks apart."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from pydantic import SecretStr

from workers.execution.celery_app import MEMORY_BROKER, make_celery
from workers.jobs import TaskName, new_id
from workers.settings import Settings


@pytest.fixture(params=["memory", "redis"])
def app(request: pytest.FixtureRequest) -> Iterator[Celery]:
    if request.param == "memory":
        made = make_celery(Settings(broker_url=None), broker=MEMORY_BROKER)
    else:
        url: str = request.getfixturevalue("redis_url")
        made = make_celery(Settings(broker_url=SecretStr(url)))
    yield made
    made.close()


def _send(app: Celery, queue_name: str, job_id: str) -> str:
    sent = app.send_task(TaskName.RUN_BATCH, args=["store", job_id, [0]], queue=queue_name)
    return str(sent.id)


def _take(app: Celery, queue_name: str, ack: bool) -> Any:
    """One message from the queue, by a consumer that then goes away."""
    with app.connection_for_read() as connection:
        consumer = connection.SimpleQueue(queue_name)
        try:
            message = consumer.get(timeout=10)
            if ack:
                message.ack()
            return message
        finally:
            consumer.close()


def _empty(app: Celery, queue_name: str) -> bool:
    with app.connection_for_read() as connection:
        consumer = connection.SimpleQueue(queue_name)
        try:
            consumer.get(timeout=0.5)
        except queue.Empty:
            return True
        finally:
            consumer.close()
    return False


def test_a_task_sent_is_delivered_once_with_its_arguments(app: Celery) -> None:
    queue_name, job = f"contract-{new_id()}", new_id()
    task_id = _send(app, queue_name, job)
    message = _take(app, queue_name, ack=True)
    assert message.headers["id"] == task_id
    assert message.headers["task"] == TaskName.RUN_BATCH
    assert message.decode()[0] == ["store", job, [0]]
    assert _empty(app, queue_name)


def test_a_task_taken_but_not_acknowledged_is_delivered_again(app: Celery) -> None:
    if app.conf.broker_url == MEMORY_BROKER:
        # The memory transport drops what a closed consumer held; the embedded worker only
        # goes away with its process, which takes the queue with it, so there is no one to
        # deliver to again.
        pytest.skip("the memory transport does not restore unacknowledged tasks")
    queue_name = f"contract-{new_id()}"
    task_id = _send(app, queue_name, new_id())
    assert _take(app, queue_name, ack=False).headers["id"] == task_id
    assert _take(app, queue_name, ack=True).headers["id"] == task_id
    assert _empty(app, queue_name)


def test_queues_keep_their_tasks_apart_and_in_order(app: Celery) -> None:
    first, second = f"contract-a-{new_id()}", f"contract-b-{new_id()}"
    sent = [_send(app, first, new_id()) for _ in range(3)]
    other = _send(app, second, new_id())
    assert [_take(app, first, ack=True).headers["id"] for _ in sent] == sent
    assert _take(app, second, ack=True).headers["id"] == other
    assert _empty(app, first)
