"""What a run computes: data, sampling, models, the DP engine and its gradient backends, the planner,
the trainer and runner."""
