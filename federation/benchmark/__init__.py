"""The benchmark protocols (docs/results.md): the paper's cross-site table and the in-domain PBC protocol.

Modules, one job each:
  prepared.py   the contract's deterministic `prepare` step, cached on disk per data set
  trunk.py      a zoo model split into a frozen trunk and a trainable top (same parameters, exportable)
  features.py   frozen-trunk outputs of clean and augmented views, cached on disk
  local_grid.py a Flower Grid that delivers messages to in-process site handlers (no SuperLink)
  sites.py      the feature-level site handlers: the ClientApp's message shapes over cached features
  runs.py       one row of a table: single-site, centralised or federated (Flower strategies)
  protocols.py  the paper and in-domain protocols, seeds, tables
  report.py     markdown, JSON and PNG output
"""
