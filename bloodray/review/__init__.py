"""Review of classified cells: the review list and its round trip, the ``reviews`` table, verified differentials.

:mod:`~bloodray.review.records` backs ``bloodray review import|refresh`` and
commits the ``verified_differentials`` Delta table;
:mod:`~bloodray.review.roundtrip` backs ``bloodray review export|labels``.
The ``reviews``, ``signoffs`` and ``verified_differentials`` query views are
the analysis package's (:mod:`bloodray.analysis.review_views`): review builds
on analysis and nightly, and neither of them imports review.
"""
