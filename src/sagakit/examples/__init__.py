"""Example applications shipped with sagakit (``sagakit demo`` runs one).

They live under the ``sagakit`` namespace so that installing sagakit adds no
generic top-level package names; their third-party needs come with the
``demo`` extra (``pip install 'sagakit[demo]'``).
"""
