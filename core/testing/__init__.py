"""Helpers for testing Mailyard and things built around it: a Redis server, processes of
the cluster, and polling with a deadline. Shipped with the package (as aiosmtpd ships its
own testing helpers) because the tests, the benchmark and users' own checks share them."""
