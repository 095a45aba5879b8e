"""Local process harnesses (Flower SuperLink/SuperNodes on loopback) for the
test suite, ``fedarches demo`` and ``examples/flower-deployment``. Not needed
by a coordinator or a site in production."""
