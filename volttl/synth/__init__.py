"""`volttl synth`: the synthetic CTPA cohort (:mod:`.cohort`) and its step (:mod:`.step`)."""
