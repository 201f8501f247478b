"""Label quality against gold masks: ``seglab evaluate``, ``seglab simulate-weak`` and conformal
calibration measured on gold images."""
