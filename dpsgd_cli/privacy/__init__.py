"""What a run spends: accounting (dp-accounting), PLD composition, σ calibration, the privacy plan, the
statement, the run's secret key."""
