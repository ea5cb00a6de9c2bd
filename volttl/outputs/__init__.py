"""What volttl writes and how it trusts it later: every output folder and its file names
(:mod:`.folders`), checksummed JSON records (:mod:`.records`), "made from these inputs?"
(:mod:`.provenance`) and whether a run may be continued or reused (:mod:`.resume`)."""
