"""Netfence: Kubernetes NetworkPolicy enforcement with ipset + iptables, driven from etcd."""

__version__ = "0.1.0"
