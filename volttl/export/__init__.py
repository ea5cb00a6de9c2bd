"""`volttl export`: a trained run as a model package (:mod:`.package`) or a MONAI bundle
(:mod:`.bundle`)."""
