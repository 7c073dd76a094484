"""ta_opd: the TA-OPD method library (pure torch)."""
