"""`volttl evaluate`: a run's figures on a split (:mod:`.step`) and the operating point and
calibration chosen on validation (:mod:`.decision`)."""
