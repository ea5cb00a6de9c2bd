"""`volttl pretrain`: the synthetic source task (:mod:`.source_task`) and training on it
(:mod:`.step`)."""
