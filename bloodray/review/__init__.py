"""Review of classified cells: the review list and its round trip, the ``reviews`` table, verified differentials.

:mod:`~bloodray.review.verified` builds the ``reviews`` and
``verified_differentials`` query views; :mod:`~bloodray.review.roundtrip`
backs ``bloodray review export|import|labels``.
"""
