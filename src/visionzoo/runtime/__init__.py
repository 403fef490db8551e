"""What runs a model fast on this machine: the CPU's identity and flags (``cpu``), the fastest Linear kernel
measured here (``linear``), the inference backends (``backends``) and the cache of measured choices
(``cache``). ``visionzoo.deploy`` chooses among them."""
