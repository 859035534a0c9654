from __future__ import annotations

import pytest

from netfence.store.errors import EtcdUnavailable
from netfence.store.etcd import resolve_endpoints


def fake(host: str, port: int) -> list[str]:
    table = {"etcd.netfence.svc.cluster.local": ["10.96.0.20"], "members": ["10.1.0.2", "10.1.0.1"]}
    if host not in table:
        raise OSError("Name or service not known")
    return sorted(table[host])


@pytest.mark.parametrize(
    ("endpoints", "targets", "server_name"),
    [
        (["127.0.0.1:2379"], ["127.0.0.1:2379"], None),
        (["https://10.0.0.5:2379/"], ["10.0.0.5:2379"], None),
        (["etcd.netfence.svc.cluster.local:2379"], ["10.96.0.20:2379"], "etcd.netfence.svc.cluster.local"),
        (["members:2379", "127.0.0.1:2380"], ["10.1.0.1:2379", "10.1.0.2:2379", "127.0.0.1:2380"], "members"),
    ],
)
def test_host_names_become_addresses_and_the_tls_name(
    endpoints: list[str], targets: list[str], server_name: str | None
) -> None:
    assert resolve_endpoints(endpoints, fake) == (targets, server_name)


def test_unresolvable_endpoint_is_a_clear_error() -> None:
    with pytest.raises(EtcdUnavailable, match="cannot resolve etcd endpoint 'nowhere:2379'"):
        resolve_endpoints(["nowhere:2379"], fake)


def test_localhost_resolves_for_real() -> None:
    targets, name = resolve_endpoints(["localhost:2379"])
    assert "127.0.0.1:2379" in targets and name == "localhost"
