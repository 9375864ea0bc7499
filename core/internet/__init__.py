"""The demo Internet: an authoritative DNS server and an SMTP sink on loopback.

Tests, the demo (``mailyard internet serve``) and the benchmark use them as the world
outside the organization, so that nothing ever talks to the real Internet.
"""
