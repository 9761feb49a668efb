"""Firewall: pure rule rendering (rules), the backend interface (base), and the
iptables-restore + ipset backend (iptables_ipset)."""
