"""`volttl predict`: new scans through a trained run or a model package (:mod:`.step`)."""
