"""The controller's start-up connection to etcd: retried at most 1 s apart until etcd answers."""

from __future__ import annotations

from typing import Any, cast

from netfence.controller.runtime import _connect_store
from netfence.store.errors import EtcdUnavailable
from netfence.store.etcd import EtcdStore


class FlakyStore:
    """Fails ``failures`` connects (etcd's name does not resolve yet), then answers."""

    def __init__(self, failures: int):
        self.failures = failures
        self.connects = 0
        self.pauses: list[float] = []

    async def connect(self) -> None:
        self.connects += 1
        if self.connects <= self.failures:
            raise EtcdUnavailable("DNS resolution failed for netfence-etcd")

    async def pause(self, delay: float) -> None:
        self.pauses.append(delay)


async def test_retries_until_etcd_answers_at_most_a_second_apart() -> None:
    store = FlakyStore(failures=8)
    await _connect_store(cast(EtcdStore, cast(Any, store)))
    assert store.connects == 9
    assert store.pauses[0] < 1.0
    assert max(store.pauses) <= 1.0  # never Kopf's 60 s start-up handler retry


async def test_connects_at_once_when_etcd_answers() -> None:
    store = FlakyStore(failures=0)
    await _connect_store(cast(EtcdStore, cast(Any, store)))
    assert (store.connects, store.pauses) == (1, [])
