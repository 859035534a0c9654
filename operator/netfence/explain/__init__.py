"""``netfence explain``: why a connection is allowed or denied, from the committed model the agents render.

* :mod:`netfence.explain.trace` (pure): the evaluator over ``NodeModel`` values, with the
  rule that allows a connection or the nearest miss;
* :mod:`netfence.explain.report` (pure): the explanation as data (``-o json``) and as text;
* :mod:`netfence.explain.gather` (I/O): pods from the API server, the committed model and
  node reports from etcd, live counters from the nodes.
"""
