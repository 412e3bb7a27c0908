"""The programs that run inside Tailor's pods (or as local processes): train, index,
serve, raft_data and evaluate. Each is ``python -m tailor.workloads.<name> --spec FILE``,
where FILE is the JSON of a run model from :mod:`tailor.api.workloads`. They import only
``tailor.api`` and ``tailor.observability``, never the operator.
"""
