"""What a run leaves: the run directory, checkpoint, metrics records, sweeps, summaries, plots, export."""
