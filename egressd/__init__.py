"""egressd: a per-uid DNS allowlist egress firewall (ipset + iptables)."""

__version__ = "0.1.0"
