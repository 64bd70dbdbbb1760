"""The operations side of runops: everything an operator or a developer runs, nothing an
application needs. The client (``runops``) never imports it; it imports the client.

* ``cli`` — the ``runops`` command;
* ``local_cluster`` — the local stores of ``runops dev up`` and the tests' throwaway clusters;
* ``schema`` — where ``sql/`` and ``migrations/`` are, and how a store installs them;
* ``migrate`` — upgrading both stores and wiring them together (FDW, tenant mirror);
* ``revision`` — adding a shared revision: its version files (``make revision NAME=…``);
* ``doctor`` — ``runops doctor``'s checks;
* ``demo`` — ``runops demo``; ``reference_tasks`` — what ``runops worker`` runs by default;
* ``output`` — the CLI's tables and JSON.

``runops bench`` runs ``bench/harness.py`` of a checkout: the benchmarks live in ``bench/``.
"""
